"""Colour jitter and grayscale on whole float batches (B x 3 x H x W in [0, 1]); the HED jitter is hed.py."""
from __future__ import annotations

import torch

# ITU-R BT.601 luma, the weights of torchvision's rgb_to_grayscale and PIL's "L" mode
LUMA = (0.299, 0.587, 0.114)


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """out = x * U(1-c, 1+c) + U(-b, b) per image, clamped (the formula the albumentations backend uses too)."""
    b = x.shape[0]
    alpha = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * contrast
    beta = (torch.rand(b, generator=generator) * 2 - 1) * brightness
    alpha, beta = alpha.to(x)[:, None, None, None], beta.to(x)[:, None, None, None]
    return (x * alpha + beta).clamp(0.0, 1.0)


def luma(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 1 x H x W, the luma of each pixel."""
    return sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> the same shape with three equal channels (the luma of each pixel)."""
    return luma(x).expand_as(x).contiguous()
