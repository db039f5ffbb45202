"""The albumentations backend (`aug.backend: albumentations`): per-image views and colour jitter on CPU
DataLoader workers. Kept apart so that the default torch backend never imports albumentations."""
from __future__ import annotations

import albumentations as A

from ..config import AugCfg
from .hed import hed_transform_np


class HEDJitter(A.ImageOnlyTransform):
    """Albumentations transform: random HED stain jitter of strength `sigma` on uint8 RGB images."""

    def __init__(self, sigma: float = 0.03, p: float = 1.0):
        super().__init__(p=p)
        self.sigma = sigma

    def get_params_dependent_on_data(self, params, data):
        s = self.sigma
        return {"alpha": self.random_generator.uniform(1 - s, 1 + s, 3),
                "beta": self.random_generator.uniform(-s, s, 3)}

    def apply(self, img, alpha=None, beta=None, **params):
        return hed_transform_np(img, alpha, beta)

    def get_transform_init_args_names(self):
        return ("sigma",)


def build_pipeline(cfg: AugCfg, seed: int | None = None, colour: bool = True) -> A.Compose:
    """D4 views, then (colour=True) HED and brightness/contrast jitter; colour=False when a stain normaliser must
    run first (transform.py)."""
    steps = []
    if cfg.dihedral:
        steps.append(A.D4(p=1.0))
    if not colour:
        return A.Compose(steps, seed=seed)
    if cfg.hed_sigma > 0:
        steps.append(HEDJitter(cfg.hed_sigma, p=1.0))
    if cfg.brightness > 0 or cfg.contrast > 0:
        # out = img * U(1-c, 1+c) + 255 * U(-b, b), the formula `brightness_contrast` uses too
        steps.append(A.RandomBrightnessContrast(cfg.brightness, cfg.contrast, brightness_by_max=True, p=1.0))
    return A.Compose(steps, seed=seed)  # seeded: runs repeat exactly (workers are reseeded per worker)
