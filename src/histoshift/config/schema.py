"""The Config: the sections (base.py, sections.py, model.py) in one validated record, and the one-line method text
and identity a run is filed under."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, ValidationError, model_validator

from .base import ConfigError, Section
from .errors import error_line
from .model import ImageModelCfg, ModelCfg, moved_store_keys
from .sections import AlgorithmCfg, AugCfg, OptimCfg, StainGanCfg, TrainCfg

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
        if not self.model.fine_tuned and self.algorithm.alters_images:
            raise ValueError("algorithm.consistency_weight / regen_weight alter images: they need a fine-tuned "
                             "backbone (model.kind: image), not a head on stored features")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()

    def method(self) -> str:
        """How a run of this config is made, in one line (the report's method column): the model (its kind describes
        itself), the algorithm, and every switch against the shift that is on."""
        m, a, t = self.model, self.algorithm, self.train
        parts = [m.describe(), a.name.upper().replace("_", " + ")]
        parts += [
            f"{k} {v}"
            for k, v in [
                ("optimizer", self.optim.name if self.optim.name != "adamw" else None),
                ("averaging", t.average if t.average != "none" else None),
                ("early stopping patience", t.early_stop_patience or None),
                ("stain norm", self.aug.stain_norm if self.aug.stain_norm != "none" else None),
                ("Stain-AgLr consistency", a.consistency_weight or None),
                ("Stain-AgLr regeneration", a.regen_weight or None),
                ("entropy", a.entropy_weight or None),
                *m.switches(),
            ]
            if v is not None
        ]
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


def validated(data: dict) -> Config:
    """A Config from a mapping, or ConfigError with the first problem (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    data = moved_store_keys(data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(error_line(e.errors()[0], Config)) from None


