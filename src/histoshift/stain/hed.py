"""HED stain maths (Ruifrok & Johnston colour deconvolution; Tellez et al. stain jitter), used by both
augmentation backends (`transform.py` on whole batches, `albu.py` per image), the HED views of the
feature store, the data overview and the demo data.

Optical density -> H, E, D concentrations, each scaled by alpha and shifted by beta, back to RGB.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
# torch is imported inside the two functions that use it: the demo data and the data overview (`prepare`) need
# only the matrices, and importing torch costs their processes 2.4 s on 2 cores

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def hed_transform_np(img: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """img: H x W x 3 uint8 -> uint8 with H/E/D concentrations scaled by alpha and shifted by beta."""
    od = -np.log((img.astype(np.float32) + 1.0) / 256.0)
    conc = od @ HED_FROM_RGB.astype(np.float32)
    conc = conc * alpha.astype(np.float32) + beta.astype(np.float32)
    rgb = 256.0 * np.exp(-(conc @ RGB_FROM_HED.astype(np.float32))) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_transform(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x: B x 3 x H x W float in [0, 1]; alpha, beta: B x 3. Same formula as `hed_transform_np`."""
    import torch

    m_in = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    m_out = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    conc = torch.einsum("bchw,cd->bdhw", od, m_in)
    conc = conc * alpha[:, :, None, None] + beta[:, :, None, None]
    rgb = 256.0 * torch.exp(-torch.einsum("bdhw,dc->bchw", conc, m_out)) - 1.0
    return (rgb / 255.0).clamp(0.0, 1.0)


def random_hed(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """HED stain jitter of a float batch in [0, 1]: per image and H/E/D channel, concentrations scaled
    by U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma)."""
    import torch

    b = x.shape[0]
    alpha = 1 + (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    return hed_transform(x, alpha.to(x), beta.to(x))
