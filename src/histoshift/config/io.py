"""Config files: YAML in (a file, then `key.sub=value` overrides merged into it), the resolved config out."""
from __future__ import annotations

import typing
from pathlib import Path

import yaml

from ..safeio import write_text
from .base import ConfigError
from .schema import Config, validated
from .model import forget_deprecations

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
