"""The one input transform of a config's colour settings, built by the task and applied by both augmentation
backends at the same point (the float batch on the device), in one order:

    stain normalisation (none | reinhard | macenko | the stain GAN's generator)
      -> colour jitter (HED, brightness, contrast; training only)
        -> grayscale (aug.grayscale)

A normaliser must see the stored colours, else it undoes the jitter. So the albumentations backend's CPU
workers jitter colour only when there is no normaliser; with one, they make the dihedral views alone and the
jitter follows the normaliser here, with the same distributions (hed.py, jitter.py: the same formulas).
Nothing is attached to the config: the generator is an explicit argument.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import AugCfg
from .classical import CLASSICAL
from .hed import random_hed
from .jitter import brightness_contrast, to_gray

Batch = Callable[[torch.Tensor], torch.Tensor]


class InputTransform:
    def __init__(self, aug: AugCfg, colourizer: Batch | None = None):
        if aug.stain_norm == "gan" and colourizer is None:
            raise ValueError("aug.stain_norm=gan: the transform needs the stain-gan stage's generator "
                             "(stain.gan.load_colourizer)")
        self.aug = aug
        self.colourizer = colourizer if aug.stain_norm == "gan" else None
        self._normalise: Batch | None = self.colourizer or CLASSICAL.get(aug.stain_norm)

    @property
    def workers_jitter(self) -> bool:
        """Whether the albumentations workers jitter colour (only without a normaliser to follow)."""
        return self.aug.backend == "albumentations" and self._normalise is None

    def worker_pipeline(self, seed: int | None = None):
        """The albumentations backend's per-image pipeline (dihedral views; colour jitter when `workers_jitter`)."""
        from .albu import build_pipeline  # albumentations is imported only when it is used

        return build_pipeline(self.aug, seed, colour=self.workers_jitter)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._normalise is None else self._normalise(x)

    def jitter(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.aug
        if a.hed_sigma > 0:
            x = random_hed(x, a.hed_sigma, generator)
        if a.brightness > 0 or a.contrast > 0:
            x = brightness_contrast(x, a.brightness, a.contrast, generator)
        return x

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A training batch (float B x 3 x H x W in [0, 1], its views made): normalise -> jitter -> grayscale."""
        x = self.normalise(x)
        if not self.workers_jitter:
            x = self.jitter(x, generator)
        return to_gray(x) if self.aug.grayscale else x

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """A batch to predict on or embed: normalise -> grayscale (no jitter)."""
        x = self.normalise(x)
        return to_gray(x) if self.aug.grayscale else x
