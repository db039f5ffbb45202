"""Aberrant-patch measures: black scanner artefacts and blank (white or flat) patches.

A published report on this competition found that clean patches rarely hold more than 10
pure-black pixels (all channels 0) while scanner artefacts hold hundreds; more than 200 marks
a patch as aberrant. Patches that are mostly pure white, or flat, carry no tissue either.
Aberrant patches are left out of training only; test patches are always predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QualityRule:
    max_black: int = 200  # pure-black pixels (all channels == 0) allowed
    white_level: int = 250  # a pixel is white when every channel is >= this
    max_white_frac: float = 0.9  # share of white pixels above which a patch is blank
    min_std: float = 2.0  # grey-level standard deviation below which a patch is flat (blank)


def measure(images: np.ndarray, rule: QualityRule = QualityRule()) -> dict[str, np.ndarray]:
    """images: N x S x S x 3 uint8 -> per-patch n_black, n_white, grey std, aberrant flag and reason."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected N x S x S x 3 uint8 images, got {images.shape} {images.dtype}")
    n_pix = images.shape[1] * images.shape[2]
    n_black = (images.max(axis=-1) == 0).reshape(len(images), -1).sum(1)
    n_white = (images.min(axis=-1) >= rule.white_level).reshape(len(images), -1).sum(1)
    grey_std = images.reshape(len(images), -1).astype(np.float32).std(1)
    black = n_black > rule.max_black
    white = n_white > rule.max_white_frac * n_pix
    flat = grey_std < rule.min_std
    reason = np.where(black, "black", np.where(white, "white", np.where(flat, "flat", "")))
    return {
        "n_black": n_black.astype(np.int32),
        "n_white": n_white.astype(np.int32),
        "grey_std": grey_std.astype(np.float64).round(2),
        "aberrant": black | white | flat,
        "reason": reason,
    }
