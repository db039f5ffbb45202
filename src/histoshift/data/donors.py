"""The donor pool of Fourier test-time transfer (stain/fourier.py) and the prediction sets `infer --fourier` makes
from it: a fixed sample of the train split's centers, read once from the cache. Every number about the donors
lives here: the pool's size, the betas and donors `infer --fourier` predicts by default, the donor counts the stack
tries (the sets' names: stack.sets.PredictionSet.fourier)."""
from __future__ import annotations

from ..config import ConfigError

# torch, the transfer (stain/fourier.py) and the views are imported where the pool goes to a device: the infer
# stage's arguments read this module's defaults, and the CLI builds every stage's arguments at start

POOL_PER_CENTER = 128  # donors drawn from each training center (a fixed, seeded sample of the train split)
BETAS = (0.01, 0.03, 0.05)  # infer --fourier's default disc radii (a share of the patch side; stain/fourier.py)
DONORS = 7  # infer --fourier's default donors (views) a patch, as the paper
DONORS_TRIED = (1, 3, 7)  # donors a patch the stack tries (each at most what infer --fourier predicted)


def donor_counts(predicted: int) -> list[int]:
    """The donor counts the stack compares for a set predicted with `predicted` donors: DONORS_TRIED below it, and
    all of them."""
    return sorted({*(n for n in DONORS_TRIED if n < predicted), predicted})


def donor_rows(index, per_center: int = POOL_PER_CENTER, seed: int = 0):
    """The donor pool: up to `per_center` patches of each center of the train split (the source centers; no
    label is read), a fixed sample (seeded), aberrant patches left out, in index order."""
    import numpy as np
    import pandas as pd

    train = (
        index[(index["split"] == "train") & ~index["aberrant"]]
        if "aberrant" in index
        else index[index["split"] == "train"]
    )
    rng = np.random.default_rng(seed)
    keep = [part.iloc[np.sort(rng.choice(len(part), min(per_center, len(part)), replace=False))]
            for _, part in train.groupby("center", sort=True)]
    return pd.concat(keep) if keep else train.iloc[:0]


class FourierTTA:
    """The Fourier prediction sets `infer --fourier` makes: one per beta, each with `donors` views (nearest donor
    first), the donor pool `per_center` patches of each training center. `settings(beta)` is what a set's files
    record and are checked against (stale when any of it, or the pool, changes)."""

    def __init__(self, betas=BETAS, donors: int = DONORS, per_center: int = POOL_PER_CENTER):
        if not betas or any(b < 0 for b in betas) or donors < 1 or per_center < 1:
            raise ConfigError(f"Fourier transfer: betas {betas} (>= 0, at least one), donors {donors} and per_center "
                             f"{per_center} (>= 1)")
        self.betas, self.donors, self.per_center = tuple(float(b) for b in betas), int(donors), int(per_center)
        self._pool = None

    def pool(self, cache):
        """(donor rows, their images as uint8 N x H x W x 3), read once."""
        if self._pool is None:
            rows = donor_rows(cache.index, self.per_center)
            self._pool = rows, cache.gather(rows)
        return self._pool

    def settings(self, beta: float, cache) -> dict:
        import hashlib

        rows, _ = self.pool(cache)
        ids = hashlib.sha256(",".join(map(str, rows["id"])).encode()).hexdigest()[:16]
        return {"beta": beta, "donors": self.donors, "per_center": self.per_center, "pool": ids}

    def donors_for(self, cache, device, transform=None):
        """The pool on `device` (a stain.fourier.Donors) as float images in [0, 1], through the run's input
        transform when it has one."""
        import torch

        from ..stain.fourier import Donors
        from .augment import to_float

        rows, images = self.pool(cache)
        x = to_float(torch.from_numpy(images).to(device))
        return Donors(
            transform(x) if transform is not None else x, torch.as_tensor(rows["center"].to_numpy(), device=device)
        )
