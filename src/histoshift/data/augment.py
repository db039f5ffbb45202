"""Augmentation and input preparation.

Two interchangeable training paths, chosen by `aug.backend`:
  * "albumentations": per image on CPU DataLoader workers (A.D4, HED jitter, brightness/contrast);
  * "torch": the same transforms on whole batches on the training device.
Both draw from the same distributions (same formulas, same parameter ranges). `to_model_input` then
turns uint8 NHWC batches into normalised float NCHW at the backbone's input size, on the device.
The 8 dihedral views (4 rotations x optional flip) double as the TTA views at inference.

HED stain jitter (Tellez et al.): optical density -> H, E, D concentrations (Ruifrok-Johnston
matrix), each scaled by U(1-s, 1+s) and shifted by U(-s, s), back to RGB.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugCfg
from .stain import stain_normalize

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
N_VIEWS = 8


def hed_transform_np(img: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """img: H x W x 3 uint8 -> uint8 with H/E/D concentrations scaled by alpha and shifted by beta."""
    od = -np.log((img.astype(np.float32) + 1.0) / 256.0)
    conc = od @ HED_FROM_RGB.astype(np.float32)
    conc = conc * alpha.astype(np.float32) + beta.astype(np.float32)
    rgb = 256.0 * np.exp(-(conc @ RGB_FROM_HED.astype(np.float32))) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_transform(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x: B x 3 x H x W float in [0, 1]; alpha, beta: B x 3. Same formula as `hed_transform_np`."""
    m_in = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    m_out = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    conc = torch.einsum("bchw,cd->bdhw", od, m_in)
    conc = conc * alpha[:, :, None, None] + beta[:, :, None, None]
    rgb = 256.0 * torch.exp(-torch.einsum("bdhw,dc->bchw", conc, m_out)) - 1.0
    return (rgb / 255.0).clamp(0.0, 1.0)


def build_albumentations(cfg: AugCfg, seed: int | None = None):
    """The albumentations backend's per-image pipeline (albumentations is imported only when it is used)."""
    from .albu import build_pipeline

    return build_pipeline(cfg, seed)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k in 0..7 of a B x C x H x W batch: rotate by 90*(k % 4) degrees, then flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def view_stack(x: torch.Tensor, views, preprocess: "Preprocess") -> torch.Tensor:
    """All requested dihedral views of a float batch, one after another (V*B images), preprocessed:
    one forward pass serves every TTA view. `per_view` undoes the stacking on the outputs."""
    return preprocess(torch.cat([dihedral(x, k) for k in views]))


def per_view(out: torch.Tensor, n_views: int) -> torch.Tensor:
    """(V*B, ...) outputs of `view_stack` -> (B, V, ...)."""
    return out.view(n_views, -1, *out.shape[1:]).transpose(0, 1)


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
    x = stain_normalize(x.float().div_(255.0), cfg.stain_norm)
    if cfg.hed_sigma > 0:
        x = random_hed(x, cfg.hed_sigma, generator)
    if cfg.brightness > 0 or cfg.contrast > 0:
        x = brightness_contrast(x, cfg.brightness, cfg.contrast, generator)
    return x


def random_hed(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """HED stain jitter of a float batch in [0, 1]: per image and H/E/D channel, concentrations scaled
    by U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma)."""
    b = x.shape[0]
    alpha = 1 + (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    return hed_transform(x, alpha.to(x), beta.to(x))


def to_float(images: torch.Tensor, stain_norm: str = "none") -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x H x W in [0, 1] (stain-normalised when asked)."""
    return stain_normalize(images.permute(0, 3, 1, 2).float().div_(255.0), stain_norm)


def resize(x: torch.Tensor, size: int, interpolation: str = "bilinear", crop_pct: float = 1.0) -> torch.Tensor:
    """Square float batch in [0, 1] -> `size` px: resized to size / crop_pct, then centre-cropped
    (crop_pct 1: no crop). Bicubic output is clamped to [0, 1], as a PIL or uint8 pipeline does."""
    resized = int(round(size / crop_pct))
    if x.shape[-1] != resized:
        x = F.interpolate(x, size=(resized, resized), mode=interpolation, antialias=interpolation != "nearest",
                          **({} if interpolation == "nearest" else {"align_corners": False}))
        if interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)
    if resized != size:
        top = (resized - size) // 2
        x = x[..., top:top + size, top:top + size]
    return x


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects of a float RGB batch in [0, 1]: side, resize rule and mean/std
    (from a foundation-model recipe, or from timm's pretrained config). Runs on the batch's device."""
    mean: tuple
    std: tuple
    size: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(resize(x, self.size, self.interpolation, self.crop_pct), self.mean, self.std, self.size)


def normalize(x: torch.Tensor, mean, std, input_size: int) -> torch.Tensor:
    """Resize (bilinear, when the backbone wants another side) and normalise with the backbone's mean/std."""
    x = resize(x, input_size)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std
