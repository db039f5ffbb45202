"""Augmentation and input preparation.

Two interchangeable training paths, chosen by `aug.backend`:
  * "albumentations": per image on CPU DataLoader workers (A.D4, HED jitter, brightness/contrast);
  * "torch": the same transforms on whole batches on the training device.
Both draw from the same distributions (same formulas, same parameter ranges; the HED maths is
`hed.py`). The 8 dihedral views (4 rotations x optional flip) double as the TTA views at inference
(`tta.py` stacks them). Resizing and normalising for a backbone is the model's (`models/preprocess.py`).
"""
from __future__ import annotations

import torch

from ..config import AugCfg
from .hed import random_hed
from .stain import stain_normalize

N_VIEWS = 8


def build_albumentations(cfg: AugCfg, seed: int | None = None):
    """The albumentations backend's per-image pipeline (albumentations is imported only when it is used)."""
    from .albu import build_pipeline

    return build_pipeline(cfg, seed)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k in 0..7 of a B x C x H x W batch: rotate by 90*(k % 4) degrees, then flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return apply_dihedral(x, torch.randint(0, N_VIEWS, (x.shape[0],), generator=generator, device="cpu"))


def apply_dihedral(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Image i of the batch under dihedral view ks[i]."""
    ks = ks.to(x.device)
    out = torch.empty_like(x)
    for k in range(N_VIEWS):
        sel = ks == k
        if sel.any():
            out[sel] = dihedral(x[sel], k)
    return out


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    b = x.shape[0]
    alpha = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * contrast
    beta = (torch.rand(b, generator=generator) * 2 - 1) * brightness
    alpha, beta = alpha.to(x)[:, None, None, None], beta.to(x)[:, None, None, None]
    return (x * alpha + beta).clamp(0.0, 1.0)


def augment_batch(images: torch.Tensor, cfg: AugCfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """The torch backend: uint8 B x H x W x 3 on any device -> augmented float B x 3 x H x W in [0, 1].
    Views are taken on the uint8 batch (a quarter of the memory traffic of floats)."""
    x = images.permute(0, 3, 1, 2)
    if cfg.dihedral:
        x = random_dihedral(x, generator)
    x = stain_normalize(x.float().div_(255.0), cfg.stain_norm, cfg.colourizer)
    if cfg.hed_sigma > 0:
        x = random_hed(x, cfg.hed_sigma, generator)
    if cfg.brightness > 0 or cfg.contrast > 0:
        x = brightness_contrast(x, cfg.brightness, cfg.contrast, generator)
    return to_gray(x) if cfg.grayscale else x  # after the colour jitter: a grayscale, colour-augmented image


# ITU-R BT.601 luma, the weights of torchvision's rgb_to_grayscale and PIL's "L" mode
LUMA = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 1 x H x W, the luma of each pixel."""
    return sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> the same shape with three equal channels (the luma of each pixel)."""
    return luma(x).expand_as(x).contiguous()


def to_float(images: torch.Tensor, aug: AugCfg | None = None) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x H x W in [0, 1], with the colour settings of `aug` that hold at
    inference too (stain normalisation, grayscale); None: neither."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if aug is None:
        return x
    x = stain_normalize(x, aug.stain_norm, aug.colourizer)
    return to_gray(x) if aug.grayscale else x
