"""Typed experiment configuration: one YAML file per experiment plus `key.sub=value` overrides.

The sections are pydantic models (base.py, sections.py, model.py): every field has a type, a default and (where
it has one) its range or its allowed values next to it. The model section's shape follows its kind (`model.kind`:
image | feature, a tagged union). Unknown keys, wrong types, NaN/inf and out-of-range values raise `ConfigError`
naming the key, so a typo never silently trains the wrong model. Names that live in a registry (a foundation
recipe and its overrides) are checked by the stages that use them (`tasks.load_experiment`), so this package
imports no registry (and nothing that imports torch).
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError, model_validator

from ..safeio import write_text
from .base import ConfigError, Float, Int, NonNeg, Section, TRACKERS, tracker_names
from .model import (FEATURE_SHIFTS, KINDS, MODEL_KINDS, OLD_DEFAULTS, STORE_KEYS, BackboneCfg, FeatureModelCfg,
                    ImageModelCfg, ModelCfg, deprecated, forget_deprecations)
from .sections import (ALGORITHM_NAMES, EXTRA_OPTIMIZERS, AlgorithmCfg, AugCfg, OptimCfg, StainGanCfg, TrainCfg,
                       optimizer_names)

__all__ = ["ALGORITHM_NAMES", "EXTRA_OPTIMIZERS", "FEATURE_SHIFTS", "KINDS", "MODEL_KINDS", "TRACKERS", "AlgorithmCfg",
           "AugCfg", "BackboneCfg", "Config", "ConfigError", "FeatureModelCfg", "Float", "ImageModelCfg", "Int",
           "ModelCfg", "NonNeg", "OptimCfg", "StainGanCfg", "TrainCfg", "load_config", "optimizer_names",
           "save_config", "tracker_names", "validated"]

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _run_name(value: str) -> str:
    if not RUN_NAME.fullmatch(value):
        raise ValueError("must be a plain folder: 1-100 letters, digits, '.', '_' or '-', not starting with '.' "
                         f"(the run is written to work/runs/<it>/), got {value!r}")
    return value


class Config(Section):
    # the run's folder name under work/runs/ and its name in the stack's tables: a plain name (letters,
    # digits, '.', '_', '-'; not starting with '.'), never a path
    name: Annotated[str, AfterValidator(_run_name)] = "experiment"
    model: ModelCfg = ImageModelCfg()
    algorithm: AlgorithmCfg = AlgorithmCfg()
    optim: OptimCfg = OptimCfg()
    aug: AugCfg = AugCfg()
    train: TrainCfg = TrainCfg()
    stain_gan: StainGanCfg = StainGanCfg()

    @model_validator(mode="after")
    def _images_to_alter(self):
        if self.model.kind != "image" and self.algorithm.alters_images:
            raise ValueError("algorithm.consistency_weight / regen_weight alter images: they need a fine-tuned "
                             "backbone (model.kind: image), not a head on stored features")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()

    def method(self) -> str:
        """How a run of this config is made, in one line (the report's method column): the backbone, frozen or
        fine-tuned, the algorithm, and every switch against the shift that is on."""
        m, a, t = self.model, self.algorithm, self.train
        head = ("" if m.kind == "image" else
                f", {m.head if m.head != 'mlp' else ('MLP ' + str(m.head_hidden) if m.head_hidden else 'linear')} head")
        parts = [f"{m.recipe or m.backbone} {'fine-tuned' if m.kind == 'image' else 'frozen'}"
                 + (f" (robustified, {m.robustify.pair} pairs)" if m.robustify is not None else "") + head,
                 a.name.upper().replace("_", " + ")]
        parts += [f"{k} {v}" for k, v in [
            ("optimizer", self.optim.name if self.optim.name != "adamw" else None),
            ("averaging", t.average if t.average != "none" else None),
            ("early stopping patience", t.early_stop_patience or None),
            ("stain norm", self.aug.stain_norm if self.aug.stain_norm != "none" else None),
            ("Stain-AgLr consistency", a.consistency_weight or None), ("Stain-AgLr regeneration", a.regen_weight or None),
            ("entropy", a.entropy_weight or None),
            ("feature shift", getattr(m, "feature_shift", "none") if getattr(m, "feature_shift", "none") != "none" else None),
            ("self-training rounds", getattr(m, "self_train_rounds", 0) or None)] if v is not None]
        return ", ".join(parts)

    def identity(self) -> dict:
        """What makes a run this run: the resolved config without the settings that change only how it is
        watched (train.log_with) and, unless aug.stain_norm is gan, the stain GAN's (unused) settings."""
        out = self.model_dump()
        out["train"].pop("log_with")
        if self.aug.stain_norm != "gan":
            out.pop("stain_gan")
        return out

    def flat(self) -> dict:
        """The resolved config as flat `section.key` -> bool/int/float/str (a tracker's hyperparameters)."""
        def walk(node, prefix):
            for k, v in node.items():
                if isinstance(v, dict) and v:
                    yield from walk(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}", v if isinstance(v, (bool, int, float, str)) else str(v)
        return dict(walk(self.model_dump(), ""))


_MESSAGES = {  # pydantic error type -> our wording (the tests and users know these)
    "int_parsing": "expected int", "int_type": "expected int", "int_from_float": "expected an integer",
    "float_parsing": "expected float", "float_type": "expected float", "bool_parsing": "expected a boolean",
    "bool_type": "expected a boolean", "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping", "string_type": "expected a string",
}


def _line(error: dict) -> str:
    """One pydantic error as one line naming the key."""
    loc = list(error["loc"])
    if loc[:1] == ["model"] and len(loc) > 1 and loc[1] in KINDS:  # the union's tag is not a key the user wrote
        tag = loc.pop(1)
    key = ".".join(str(p) for p in loc)
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        section = MODEL_KINDS[tag] if loc[:1] == ["model"] and len(loc) == 2 else _section_of(loc[:-1])
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


def _section_of(loc: list) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        model = typing.get_type_hints(model)[part]
    return model


def _moved_store_keys(data: dict) -> dict:
    """Older configs kept the feature store's settings in the train section: moved to the model (one line)."""
    train, model = data.get("train"), data.get("model", {})
    moved = [k for k in STORE_KEYS if isinstance(train, dict) and k in train]
    if not moved or not isinstance(model, dict):
        return data
    if model.get("kind", "feature" if model.get("frozen") else "image") == "image":  # an old resolved config of a
        train = {k: v for k, v in train.items() if k not in moved or v != OLD_DEFAULTS[k]}  # fine-tuned run
        moved = [k for k in moved if k in train]
        if not moved:
            return {**data, "train": train}
    deprecated(f"train.{', train.'.join(moved)}: moved to the model section (model.kind: feature); write model.<key>")
    train = dict(train)
    data = {**data, "train": train, "model": {**data.get("model", {}), **{k: train.pop(k) for k in moved}}}
    return data


def validated(data: dict) -> Config:
    """A Config from a mapping, or ConfigError with the first problem (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    data = _moved_store_keys(data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_line(e.errors()[0])) from None


def merge(base: dict, update: dict) -> dict:
    """`update` merged into `base`: mappings (sections, recipe_overrides, timm_kwargs) key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': 3e-4}} (values parsed as YAML scalars, then typed by the fields)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not a valid YAML scalar") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    forget_deprecations()  # each load says its deprecation lines once
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
        try:
            validated(data)  # the file alone first: its errors name the file
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        data.setdefault("name", path.stem)
    for ov in overrides:
        data = merge(data, parse_override(ov))
    return validated(data)


def save_config(cfg: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
