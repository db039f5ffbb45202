"""Feature-level adaptation for heads on frozen features: an affine map in front of the head that a
target center's unlabelled features can re-estimate, as AdaBN re-estimates batch-norm statistics.

  standardize  every center centred and scaled by its own mean and standard deviation: the head trains
               on per-center standardised features; a plain prediction standardises the target with the
               training centers' pooled statistics (the head's buffers), an adapted one with the target's
               own - the frozen-feature analogue of AdaBN
  coral        CORAL (Sun & Saenko 2016, "Return of frustratingly easy domain adaptation"): the target's
               features whitened by their own (ridge-regularised) covariance and re-coloured by the
               training centers'; the head trains on raw features, a plain prediction is the identity

Only the target's features are read, never its labels. Matrix square roots by eigendecomposition in
float64 (D up to a few thousand: well under a second).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import FEATURE_SHIFTS as SHIFTS

EPS = 1e-6


CHUNK_VALUES = 1 << 20  # values per float64 chunk (8 MB; 32 MB chunks fragmented the heap): never a whole center


def _chunks(x):
    """The rows of an n x D (or n x V x D: every view) tensor as fresh float64 chunks (the callers work on them in
    place); `x` may also be a source of chunks (an object with `chunks()`: rows read from the store a chunk at a
    time) or a list of either (their rows pooled)."""
    for part in x if isinstance(x, (list, tuple)) else [x]:
        for piece in (part,) if isinstance(part, torch.Tensor) else part.chunks():
            flat = piece.reshape(-1, piece.shape[-1])
            step = max(1, CHUNK_VALUES // flat.shape[1])
            for i in range(0, len(flat), step):
                yield flat[i:i + step].to(torch.float64, copy=True)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the rows of an n x D (or n x V x D: every view) tensor, accumulated in
    float64 chunks (shifted by the first chunk's mean, so the sum of squares does not cancel)."""
    shift, total, squares, n = None, 0, 0, 0
    for c in _chunks(x):
        shift = c.mean(0) if shift is None else shift
        d = c.sub_(shift)
        total, n = total + d.sum(0), n + len(c)
        squares = squares + d.square_().sum(0)
    mean = total / n
    return shift + mean, (squares / n - mean * mean).clamp_min(0).sqrt().clamp_min(EPS)


def covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of the rows of an n x D (or n x V x D) tensor, accumulated in float64 chunks
    (shifted by the first chunk's mean)."""
    shift, total, outer, n = None, 0, 0, 0
    for c in _chunks(x):
        shift = c.mean(0) if shift is None else shift
        d = c.sub_(shift)
        total, outer, n = total + d.sum(0), outer + d.T @ d, n + len(c)
    mean = total / n
    return shift + mean, (outer - n * torch.outer(mean, mean)) / max(n - 1, 1)


def _sym_power(cov: torch.Tensor, power: float, ridge: float) -> torch.Tensor:
    """(C + ridge * mean variance * I) ** power for a symmetric positive semi-definite C."""
    reg = cov + ridge * cov.diagonal().mean().clamp_min(EPS) * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    values, vectors = torch.linalg.eigh(reg)
    return (vectors * values.clamp_min(EPS) ** power) @ vectors.T


def coral_map(source_mean: torch.Tensor, source_cov: torch.Tensor, target: torch.Tensor,
              ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map x -> x @ A + b that gives the target's rows the source's mean and covariance."""
    t_mean, t_cov = covariance(target)
    a = _sym_power(t_cov, -0.5, ridge) @ _sym_power(source_cov.double(), 0.5, ridge)
    return a, source_mean.double() - t_mean @ a


class FeatureShift(nn.Module):
    """The affine map in front of a head (`kind` in SHIFTS). Its buffers travel in the checkpoint:
    `mean`/`std` (standardize: the training centers' pooled statistics), `source_mean`/`source_cov`
    (coral: what a target is re-coloured to). `adapt_to(target)` re-estimates it from a center's
    unlabelled features and returns how many maps changed (0 for 'none')."""

    def __init__(self, dim: int, kind: str = "none", ridge: float = 0.01):
        super().__init__()
        if kind not in SHIFTS:
            raise ValueError(f"feature shift: expected one of {SHIFTS}, got {kind!r}")
        self.kind, self.ridge = kind, ridge
        if kind == "standardize":
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))
        elif kind == "coral":
            self.register_buffer("source_mean", torch.zeros(dim))
            self.register_buffer("source_cov", torch.eye(dim))
            self.affine: tuple[torch.Tensor, torch.Tensor] | None = None  # set by adapt_to, never saved

    @torch.no_grad()
    def fit_source(self, per_center: list) -> None:
        """The training centers' statistics (each center's stored features, n x V x D, or a source of chunks)."""
        if self.kind == "standardize":  # pooled: the average center's mean and spread
            stats = [moments(x) for x in per_center]
            self.mean.copy_(torch.stack([m for m, _ in stats]).mean(0))
            self.std.copy_(torch.stack([s for _, s in stats]).pow(2).mean(0).sqrt())
        elif self.kind == "coral":
            mean, cov = covariance(list(per_center))
            self.source_mean.copy_(mean)
            self.source_cov.copy_(cov)

    @torch.no_grad()
    def adapt_to(self, target) -> int:
        """Re-estimate the map from one center's unlabelled features (n x V x D, or a source of chunks)."""
        if self.kind == "standardize":
            mean, std = moments(target)
            self.mean.copy_(mean)
            self.std.copy_(std)
        elif self.kind == "coral":
            a, b = coral_map(self.source_mean, self.source_cov, target, self.ridge)
            self.affine = (a.float(), b.float())
        return int(self.kind != "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize" and not self.training:  # training rows come standardised per center
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.kind == "coral" and self.affine is not None:
            a, b = self.affine
            return x @ a.to(x) + b.to(x)
        return x
