"""The geometry of a patch: the 8 dihedral views (4 rotations x optional flip), which are the training views and
the TTA views at inference (`tta.py` stacks them), and the uint8 -> float conversion.

Colour (stain normalisation, jitter, grayscale) is the config's InputTransform (stain/transform.py); the
albumentations backend's per-image pipeline is stain/albu.py. Resizing and normalising for a backbone is the
model's (`models/preprocess.py`).
"""
from __future__ import annotations

import torch

N_VIEWS = 8


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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x H x W in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def random_views(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x H x W in [0, 1], each image under a random dihedral view (taken on the
    uint8 batch: a quarter of the memory traffic of floats)."""
    return random_dihedral(images.permute(0, 3, 1, 2), generator).float().div_(255.0)
