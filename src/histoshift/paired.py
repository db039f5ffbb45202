"""Paired evidence: two prediction sets scored on the same patches, the difference of their accuracies and its
interval. The one place where "A beats B" is decided: the stack's choice between prediction sets (choice.py,
rules.py) and the benchmarks' summaries (bench/regret.py) both call `compare`.

  compare(a, b, clusters)  a, b: per-observation correctness (0/1) of two sets on the same observations

The interval is the normal interval of a paired difference of means with a cluster-robust (sandwich) variance:
with d_i = a_i - b_i, D_g the sum of d over cluster g, N_g its size, N = sum N_g and G clusters,

    diff = sum d / N,   var = G / (G - 1) * sum_g (D_g - diff * N_g)^2 / N^2

Without clusters every observation is its own, and var is the sample variance of d over N (the paired t
interval's, with a normal quantile). Pooled evidence - several seeds, several unseen centers - repeats the same
tissue: the benchmark's hidden center is center 2's patches re-stained, and every seed predicts the same patches.
Those observations are one cluster (the patch id), so the interval does not pretend that a patch seen six times
is six independent patches. A difference is **decisive** when its interval excludes 0.

McNemar's z, (only_a - only_b) / sqrt(only_a + only_b), is reported beside it (observations, not clusters): the
stack's original rule used it and its evidence is kept comparable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """Set A against set B on the same n observations (G clusters): accuracies, A - B and its interval."""
    n: int
    clusters: int
    acc_a: float
    acc_b: float
    diff: float  # acc_a - acc_b
    lo: float
    hi: float
    only_a: int  # observations A gets right and B wrong
    only_b: int
    z: float  # McNemar's, A over B
    level: float = LEVEL

    @property
    def decisive(self) -> bool:
        """The interval excludes 0: A is better (diff > 0) or worse, not noise."""
        return self.lo > 0 or self.hi < 0

    def exceeds(self, margin: float) -> bool:
        """A beats B by more than `margin` (a share, 0.01 = one point) beyond doubt: the interval's lower end."""
        return self.lo > margin

    def text(self) -> str:
        """'+1.2 points (95% CI +0.3 to +2.1, decisive; n=2,908)', in accuracy points."""
        verdict = "decisive" if self.decisive else "not decisive"
        return (f"{100 * self.diff:+.1f} points ({self.level:.0%} CI {100 * self.lo:+.1f} to {100 * self.hi:+.1f}, "
                f"{verdict}; n={self.n:,})")

    def record(self) -> dict:
        """JSON-ready, rounded: what the stack's decision record and the benchmark files keep."""
        out = asdict(self)
        for k in ("acc_a", "acc_b", "diff", "lo", "hi"):
            out[k] = round(out[k], 5)
        out["z"] = round(out["z"], 3)
        out["decisive"] = self.decisive
        return out


def _half_width(var: float, level: float) -> float:
    """Half the normal interval of a difference with variance `var` at `level`."""
    return float(NormalDist().inv_cdf(0.5 + level / 2) * np.sqrt(var))


def mcnemar_z(a, b) -> float:
    """Paired evidence that predictions with hits `a` beat those with hits `b` on the same patches."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 0.0 if only_a + only_b == 0 else float((only_a - only_b) / np.sqrt(only_a + only_b))


def compare(a, b, clusters=None, level: float = LEVEL) -> Paired:
    """A against B: `a`, `b` per-observation correctness on the same observations; `clusters`: a key per
    observation (observations that share one are correlated: the same patch under several seeds or centers)."""
    a, b = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired comparison needs two non-empty sets of the same observations ({a.shape}, {b.shape})")
    d = a.astype(np.float64) - b.astype(np.float64)
    n = len(d)
    if clusters is None:
        sums, sizes = d, np.ones(n)
    else:
        keys = np.asarray(clusters).ravel()
        if keys.shape != d.shape:
            raise ValueError(f"one cluster key per observation: {keys.shape} keys for {d.shape} observations")
        _, which = np.unique(keys, return_inverse=True)
        sums, sizes = np.bincount(which, weights=d), np.bincount(which).astype(np.float64)
    diff = float(d.mean())
    groups = len(sums)
    var = groups / (groups - 1) * float(((sums - diff * sizes) ** 2).sum()) / n ** 2 if groups > 1 else 0.0
    half = _half_width(var, level)
    return Paired(n=n, clusters=groups, acc_a=float(a.mean()), acc_b=float(b.mean()), diff=diff,
                  lo=diff - half, hi=diff + half, only_a=int((a & ~b).sum()), only_b=int((~a & b).sum()),
                  z=mcnemar_z(a, b), level=level)


def worst_case(acc_a: float, acc_b: float, patches: int, level: float = LEVEL) -> tuple[float, float]:
    """The widest paired interval of A - B that two accuracies on the same `patches` allow, for results whose
    per-patch predictions were not kept: every error of one set a patch the other gets right (the largest
    discordance, P(d != 0) = (1 - acc_a) + (1 - acc_b)), and repeats of the same patches (seeds, re-stained
    centers) perfectly correlated, so only the distinct patches count. A difference decisive under it is
    decisive under any discordance; one that is not may still be, measured paired."""
    diff = acc_a - acc_b
    var = max(min(1.0, (1 - acc_a) + (1 - acc_b)) - diff ** 2, 0.0) / patches
    half = _half_width(var, level)
    return diff - half, diff + half
