"""The stack stage's choice (stages/stack.py writes it): which prediction set and which combiner (stack.py's
`mean`, `rank`, `stack`) go to the test center, all by leave-one-center-out accuracy on out-of-fold predictions.

The prediction sets: plain (8 dihedral views); adapted ("+adabn": `infer --adapt`, a fine-tuned backbone's
batch-norm statistics, a head's feature shift and self-training, re-done on each center from its unlabelled
patches); Fourier transfer ("+fourier-b<beta>-n<n>": `infer --fourier`, each patch given the low-frequency
amplitudes of its n nearest donors of other training centers, the first n of the set's donor views - so the
number of donors is chosen here, and beta by which set). Within each set the best mean per-center accuracy wins
(ties go to the simpler combiner, in stack.METHODS' order). Between plain and adapted, AdaBN is kept unless the
plain winner is significantly better on the same out-of-fold patches (paired McNemar z > 1.96): the labelled
centers are milder shifts than a new hospital, so their accuracies cannot tell a small AdaBN gain from noise
(measured: +-0.3 points leave-one-center-out while AdaBN gained 0.3 to 16 points on the unseen test center for
single models on the full protocol, docs/benchmarks.md), but they can still veto it when it breaks a model. A
Fourier set, with no such prior evidence and several (beta, n) candidates, must itself be significantly better
than that pick (z > 1.96) to replace it. Both comparisons are saved with the choice.

Prior matching: the competition's test center is exactly balanced. Each combiner is also scored thresholded so
that that share of patches is predicted positive (`mean@prior`, ...; the labelled centers are balanced as well);
the chosen combiner is thresholded that way on the test center only when this raises its mean per-center accuracy
leave-one-center-out (the choice's `prior_matching`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data.cache import Cache
from .runs import RunDir
from .stack import ADAPTED, METHODS, PRIOR, build_features, compare_loco, fit_stacker, predict

FOURIER = "+fourier"  # the Fourier sets' suffixes: "+fourier-b<beta>-n<donors used>"
FOURIER_DONORS = (1, 3, 7)  # donors a patch the stack tries (each at most what infer --fourier predicted)


def split_label(label: str) -> tuple[str, str]:
    """'mean+fourier-b0.03-n3' -> ('mean', '+fourier-b0.03-n3'): the combiner and the prediction set's suffix."""
    method = next(m for m in METHODS if label.startswith(m))
    return method, label[len(method):]


def adapted_ready(runs: list[RunDir], cache: Cache) -> bool:
    """Every fold model has fresh adapted predictions, and the adaptation changed something in at least
    one of them (a set equal to the plain one is not a second set)."""
    if not all(r.tta_fresh(cache.id, adapted=True) for r in runs):
        return False
    return any(r.adapted_layers() > 0 for r in runs)



def _best(means: pd.Series, methods: list[str]) -> str:
    top = max(means[m] for m in methods)
    return next(m for m in methods if means[m] >= top - 1e-12)  # ties: the simpler combiner


def mcnemar_z(a: np.ndarray, b: np.ndarray) -> float:
    """Paired evidence that predictions with hits `a` beat those with hits `b` on the same patches."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 0.0 if only_a + only_b == 0 else float((only_a - only_b) / np.sqrt(only_a + only_b))


def choose(comparison: pd.DataFrame, hits: dict | None = None, z: float = 1.96) -> tuple[str, dict | None, dict | None]:
    """The combiner and prediction set for the test center (see the module docstring); the evidence between plain
    and adapted (the best of each and the paired z of plain over adapted; None without adapted labels) and between
    the best Fourier set and that pick (None without Fourier labels). `hits`: per-patch correctness of each label,
    from `compare_loco`."""
    means = comparison.groupby("method")["accuracy"].mean()
    plain = _best(means, [m for m in METHODS if m in means])
    pick, evidence, fourier = plain, None, None
    adabn = [m + ADAPTED for m in METHODS if m + ADAPTED in means]
    others = sorted(m for m in means.index if split_label(m)[1].startswith(FOURIER))
    if (adabn or others) and hits is None:
        raise ValueError("choosing between prediction sets needs the per-patch hits")
    if adabn:
        best_adabn = _best(means, adabn)
        score = mcnemar_z(hits[plain], hits[best_adabn])
        evidence = {"plain": plain, "adabn": best_adabn, "z_plain_over_adabn": round(score, 3)}
        pick = plain if score > z else best_adabn
    if others:
        best = _best(means, others)
        score = mcnemar_z(hits[best], hits[pick])
        fourier = {"fourier": best, "against": pick, "z_fourier_over_pick": round(score, 3), "used": score > z}
        pick = best if score > z else pick
    return pick, evidence, fourier


def fourier_sets(runs: list[RunDir], cache: Cache) -> dict[str, tuple[str, int]]:
    """Suffix -> (set name, donors used) for every Fourier set that each fold model has, fresh and predicted
    with the same settings; the donors tried are FOURIER_DONORS up to those predicted, and all of them."""
    names = None
    for run in runs:
        have = run.named_sets("fourier-b")
        names = have if names is None else names & have
    out = {}
    for name in sorted(names or ()):
        settings = [run.recorded_settings(name) for run in runs]
        if any(s is None or s != settings[0] for s in settings):
            continue
        if not all(run.tta_fresh(cache.id, name, s) for run, s in zip(runs, settings)):
            continue
        donors = int(settings[0]["donors"])
        for n in sorted({*(n for n in FOURIER_DONORS if n < donors), donors}):
            out[f"+{name}-n{n}"] = (name, n)
    return out


def compare_prediction_sets(runs: list[RunDir], folds_csv: Path, cache: Cache, seed: int = 0,
                            prior: float | None = None) -> tuple[dict, pd.DataFrame, dict]:
    """Features of the plain predictions (""), and, when every fold model has them, of the adapted ones (ADAPTED)
    and of each Fourier set and number of donors; the leave-one-center-out comparison of every combiner on each
    set; per-patch hits."""
    features = {"": build_features(runs, folds_csv, cache)}
    if adapted_ready(runs, cache):
        features[ADAPTED] = build_features(runs, folds_csv, cache, adapted=True)
    for suffix, (name, n) in fourier_sets(runs, cache).items():
        features[suffix] = build_features(runs, folds_csv, cache, adapted=name, views=n)
    hits: dict = {}  # every set's out-of-fold rows are folds.csv's patches in id order: paired
    comparison = pd.concat([compare_loco(oof, names, seed, suffix, hits, prior)
                            for suffix, (oof, _, names) in features.items()], ignore_index=True)
    return features, comparison, hits


def prior_choice(comparison: pd.DataFrame, label: str, prior: float | None) -> dict | None:
    """Whether to threshold the chosen combiner to the known positive share: only when that raises
    its mean per-center accuracy leave-one-center-out (the labelled centers are balanced too)."""
    if not prior:
        return None
    means = comparison.groupby("method")["accuracy"].mean()
    without, with_prior = float(means[label]), float(means[label + PRIOR])
    return {"share": prior, "loco_without": round(without, 5), "loco_with": round(with_prior, 5),
            "used": with_prior > without + 1e-12}


def decide(features: dict, comparison: pd.DataFrame, hits: dict, prior: float | None, seed: int = 0) -> dict:
    """The stack stage's decision, a pure function of the compared prediction sets (`compare_prediction_sets`):
    the combiner and prediction set (see the module docstring), whether prior matching is used, and the
    test center's scores and 0/1 predictions. The stage writes it; the accuracy benchmark scores it."""
    label, evidence, fourier = choose(comparison[~comparison["method"].str.endswith(PRIOR)], hits)
    matched = prior_choice(comparison, label, prior)
    method, suffix = split_label(label)
    oof, test, names = features[suffix]
    stacker = fit_stacker(oof, names, seed) if method == "stack" else None
    used = bool(matched and matched["used"])
    score, pred = predict(method, test, names, stacker, prior if used else None)
    # method: the combiner, its prediction set's suffix ("+adabn", "+fourier-..."), "@prior" thresholded to the share
    return {"label": label, "method": label + (PRIOR if used else ""), "adabn": suffix == ADAPTED,
            "prediction_set": suffix, "evidence": evidence, "fourier": fourier, "prior_matching": matched,
            "names": names, "oof": oof, "test": test, "score": score, "pred": pred}
