"""The config's colour settings as one InputTransform (stain/transform.py): the stain GAN's generator loaded when
aug.stain_norm is gan, and what a run or a feature store records of it."""
from __future__ import annotations

from ..config import Config
from ..paths import Paths
from ..stain.gan import load_colourizer
from ..stain.transform import InputTransform


def input_transform(cfg: Config, cache, paths: Paths, device) -> tuple[InputTransform, dict]:
    """(the transform, the lineage record of its generator: {} unless aug.stain_norm is gan)."""
    if cfg.aug.stain_norm != "gan":
        return InputTransform(cfg.aug), {}
    colourizer = load_colourizer(cfg, cache, paths, device)
    return InputTransform(cfg.aug, colourizer), {"stain_gan": colourizer.identity}
