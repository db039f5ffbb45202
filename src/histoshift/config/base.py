"""What every config section shares: the error class, the strict base model, typed numbers, tracker names."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..errors import HistoshiftError


class ConfigError(HistoshiftError, ValueError):
    """An unknown key or a value of the wrong type in a config file or override."""


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got boolean {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
NonNeg = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


# the tracker names Accelerate knows (accelerate.utils.LoggerType without "all"; a test keeps them equal)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def tracker_names(text: str) -> list[str]:
    """'tensorboard,wandb' -> the list, checked (ConfigError naming the unknown one)."""
    try:
        return names(text)
    except ValueError as e:
        raise ConfigError(f"log_with: {e}") from None


def names(value):
    """Trackers as a list: "tensorboard,wandb" or a YAML list; each one Accelerate knows."""
    found = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(found, list):
        raise ValueError(f"expected tracker names (a list or 'a,b'), got {value!r}")
    unknown = [n for n in found if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r} (known: {', '.join(TRACKERS)})")
    return list(dict.fromkeys(found))
