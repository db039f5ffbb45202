"""Validation errors in the project's words: one pydantic error -> one line naming the config key (the tests and
users know these wordings)."""
from __future__ import annotations

import typing

from pydantic import BaseModel

from .model import KINDS, MODEL_KINDS

_MESSAGES = {  # pydantic error type -> our wording (the tests and users know these)
    "int_parsing": "expected int",
    "int_type": "expected int",
    "int_from_float": "expected an integer",
    "float_parsing": "expected float",
    "float_type": "expected float",
    "bool_parsing": "expected a boolean",
    "bool_type": "expected a boolean",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "string_type": "expected a string",
}


def error_line(error: dict, root: type[BaseModel]) -> str:
    """One pydantic error of validating `root` (the Config) as one line naming the key."""
    loc = list(error["loc"])
    if loc[:1] == ["model"] and len(loc) > 1 and loc[1] in KINDS:  # the union's tag is not a key the user wrote
        tag = loc.pop(1)
    key = ".".join(str(p) for p in loc)
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        section = MODEL_KINDS[tag] if loc[:1] == ["model"] and len(loc) == 2 else _section_of(root, loc[:-1])
        where = f" for model.kind: {tag}" if section in MODEL_KINDS.values() else ""
        return f"unknown config key '{key}'{where} (known: {', '.join(sorted(section.model_fields))})"
    if kind == "union_tag_invalid":
        return f"{key}.kind: expected one of {', '.join(KINDS)}, got {ctx.get('tag')!r}"
    if kind == "value_error":  # our own validators: the model-level ones name their keys already
        text = str(ctx.get("error", error["msg"]))
        return f"{key}: {text}" if key and key not in text else text
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value}"
    if kind in ("greater_than_equal", "less_than_equal"):
        op, bound = (">=", ctx["ge"]) if kind == "greater_than_equal" else ("<=", ctx["le"])
        return f"{key}: must be {op} {bound}, got {value}"
    if kind == "literal_error":
        return f"{key}: expected {ctx.get('expected')}, got {value!r}"
    return f"{key}: {_MESSAGES.get(kind, error['msg'])}, got {value!r}"


def _section_of(root: type[BaseModel], loc: list) -> type[BaseModel]:
    model = root
    for part in loc:
        model = typing.get_type_hints(model)[part]
    return model
