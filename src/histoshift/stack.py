"""The stack stage's computations (stages/stack.py runs them): ensemble the fold models' TTA logits and choose how
to combine them.

Features per ensemble member m (one config and seed, all its folds):
  m__mean    mean logit over the 8 TTA views
  m__spread  standard deviation over the views (how unsure the model is under rotation/flip)
For labelled patches they come from the one fold model that never saw the patch's center (out of
fold); for the test center they are averaged over the member's fold models. The center id is
never a feature.

Three combiners are evaluated leave-one-center-out on the out-of-fold features:
  mean   average of m__mean over members, threshold 0 (probability 0.5)
  rank   average of per-member percentile ranks, thresholded at the positive rate that `mean`
         predicts on the same patches (ranks carry no threshold of their own)
  stack  LightGBM on all features, trained on the other centers' out-of-fold rows, threshold 0.5
When every fold model also has adapted predictions (`infer --adapt`: a fine-tuned backbone's batch-norm
statistics, a head's feature shift and self-training, re-done on each center from its unlabelled patches
before predicting it), the three combiners are also scored on those ("mean+adabn", ...).
Within each prediction set the best mean per-center accuracy wins (ties go to the simpler combiner,
in the order above). Between the sets, AdaBN is kept unless the plain winner is significantly better
on the same out-of-fold patches (paired McNemar z > 1.96): the labelled centers are milder shifts
than a new hospital, so their accuracies cannot tell a small AdaBN gain from noise (measured: +-0.3
points leave-one-center-out while AdaBN gained 0.3 to 16 points on the unseen test center for single
models on the full protocol, docs/benchmarks.md), but they can still veto it when it breaks a model. The
comparison is saved beside the test scores.

Prior matching: the competition's test center is exactly balanced. Each combiner is also scored
thresholded so that that share of patches is predicted positive (`mean@prior`, ...; the labelled
centers are balanced as well); the chosen combiner is thresholded that way on the test center only
when this raises its mean per-center accuracy leave-one-center-out (the choice's `prior_matching`).
"""
from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from .data.cache import Cache
from .data.folds import check_folds, read_folds
from .lineage import StaleError
from .metrics import accuracy, brier, ece, sigmoid
from .tta import check_finite, view_columns
from .runs import RunDir
from .errors import HistoshiftError, Missing

METHODS = ("mean", "rank", "stack")
ADAPTED = "+adabn"  # suffix of a combiner scored on adapted predictions (named after the first adaptation)
PRIOR = "@prior"  # suffix of a combiner thresholded to the known positive share (prior matching)
LGB_PARAMS = dict(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=20,
                  subsample=0.8, subsample_freq=1, colsample_bytree=1.0, reg_lambda=1.0,
                  deterministic=True, force_row_wise=True, verbose=-1)


class StackError(HistoshiftError, ValueError):
    """Predictions the stack stage must not combine (not out of fold, inconsistent across folds)."""


def _views(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise Missing(f"{path}: missing; run the infer stage first")
    t = check_finite(pd.read_csv(path), str(path))  # NaN must not become a class by accident
    v = t[view_columns(t)].to_numpy(dtype=float)
    return pd.DataFrame({"id": t["id"], "center": t["center"], "label": t["label"],
                         "mean": v.mean(1), "spread": v.std(1)})


def adapted_ready(runs: list[RunDir], cache: Cache) -> bool:
    """Every fold model has fresh adapted predictions, and the adaptation changed something in at least
    one of them (a set equal to the plain one is not a second set)."""
    if not all(r.tta_fresh(cache.id, adapted=True) for r in runs):
        return False
    return any(r.adapted_layers() > 0 for r in runs)


def check_lineage(runs: list[RunDir], cache: Cache, adapted: bool = False) -> None:
    """Refuse runs trained on another cache and TTA files predicted from another checkpoint or cache."""
    for run in runs:
        run.check_inputs(cache.digests)
        stale = run.stale_predictions(cache.id, adapted)
        if stale:
            raise StaleError(f"{run.path}: {', '.join(stale)} missing or predicted from another checkpoint or cache; "
                             "run the infer stage")


def build_features(runs: list[RunDir], folds_csv: Path, cache: Cache, adapted: bool = False
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Out-of-fold features of every labelled patch and averaged features of every test patch
    (from the adapted predictions with `adapted`)."""
    def tta(run: RunDir, part: str) -> Path:
        return run.tta_path(part, adapted)

    check_lineage(runs, cache, adapted)
    folds = read_folds(folds_csv)
    check_folds(folds, cache.index, folds_csv)
    expected_folds = sorted(int(f) for f in folds["fold"].unique())
    members: dict[str, list[RunDir]] = {}
    for run in runs:
        members.setdefault(run.model_name, []).append(run)
    oof = folds[["id", "center", "label"]].sort_values("id").reset_index(drop=True)
    test = None
    names = []
    for name, member_runs in sorted(members.items()):
        have = sorted(r.fold for r in member_runs)
        if have != expected_folds:
            print(f"stack: skipping {name}: folds {have} finished, {expected_folds} needed")
            continue
        names.append(name)
        parts = []
        for run in member_runs:
            part = _views(tta(run, "heldout"))
            want = set(folds.loc[folds["fold"] == run.fold, "id"])
            if set(part["id"]) != want or (part["center"] != run.fold).any():
                raise StackError(f"{tta(run, 'heldout')}: ids are not exactly the held-out center {run.fold} "
                                 "of folds.csv: these predictions would not be out of fold")
            parts.append(part)
        member_oof = pd.concat(parts).set_index("id")
        oof[f"{name}__mean"] = member_oof.loc[oof["id"], "mean"].to_numpy()
        oof[f"{name}__spread"] = member_oof.loc[oof["id"], "spread"].to_numpy()
        tests = [_views(tta(r, "test")).sort_values("id").reset_index(drop=True) for r in member_runs]
        if test is None:
            test = tests[0][["id", "center"]].copy()
        for t in tests:
            if not np.array_equal(t["id"].to_numpy(), test["id"].to_numpy()):
                raise StackError(f"{name}: fold models predicted different test ids")
        test[f"{name}__mean"] = np.mean([t["mean"] for t in tests], axis=0)
        test[f"{name}__spread"] = np.mean([t["spread"] for t in tests], axis=0)
    if not names:
        raise Missing("stack: no ensemble member has finished every fold")
    return oof, test, names


def feature_columns(names: list[str]) -> list[str]:
    return [f"{n}__{kind}" for n in names for kind in ("mean", "spread")]


def mean_score(feats: pd.DataFrame, names: list[str]) -> np.ndarray:
    return feats[[f"{n}__mean" for n in names]].to_numpy().mean(1)


def rank_predict(feats: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ranks = np.mean([feats[f"{n}__mean"].rank(pct=True).to_numpy() for n in names], axis=0)
    n_positive = int((mean_score(feats, names) > 0).sum())  # the positive count `mean` predicts
    pred = np.zeros(len(ranks), dtype=int)
    pred[np.argsort(-ranks, kind="stable")[:n_positive]] = 1
    return ranks, pred


def fit_stacker(oof: pd.DataFrame, names: list[str], seed: int = 0) -> lgb.LGBMClassifier:
    """LightGBM on out-of-fold features only (never test rows, never the center id)."""
    cols = feature_columns(names)
    if (oof["label"] < 0).any():
        raise ValueError("stacker rows must be labelled out-of-fold rows")
    model = lgb.LGBMClassifier(random_state=seed, **LGB_PARAMS)
    model.fit(oof[cols], oof["label"])
    return model


def prior_match(score: np.ndarray, share: float) -> np.ndarray:
    """0/1 predictions with the `share` of highest scores positive (ties broken by order)."""
    pred = np.zeros(len(score), dtype=int)
    pred[np.argsort(-np.asarray(score), kind="stable")[:int(round(share * len(score)))]] = 1
    return pred


def predict(method: str, feats: pd.DataFrame, names: list[str], stacker=None,
            prior: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(score, 0/1 prediction) of one combiner; with `prior`, thresholded so that this share of the
    patches is predicted positive (the combiner's own threshold otherwise)."""
    if prior:
        score, _ = predict(method, feats, names, stacker)
        return score, prior_match(score, prior)
    if method == "mean":
        s = mean_score(feats, names)
        return s, (s > 0).astype(int)
    if method == "rank":
        return rank_predict(feats, names)
    if method == "stack":
        p = stacker.predict_proba(feats[feature_columns(names)])[:, 1]
        return p, (p > 0.5).astype(int)
    raise ValueError(f"unknown combiner {method}")


def probability(method: str, score: np.ndarray) -> np.ndarray | None:
    """A combiner's tumour probability for calibration metrics: the sigmoid of the mean logit, the
    stacker's own probability; None for `rank` (percentile ranks are an order, not a probability)."""
    return sigmoid(score) if method == "mean" else score if method == "stack" else None


def compare_loco(oof: pd.DataFrame, names: list[str], seed: int = 0, suffix: str = "",
                 hits: dict | None = None, prior: float | None = None) -> pd.DataFrame:
    """Per-center accuracy (and Brier score, ECE) of each combiner, each center scored by a stacker that never saw it;
    `suffix` labels the prediction set (ADAPTED for AdaBN predictions); with `prior`, each combiner is
    also scored thresholded to that positive share (label + PRIOR). `hits`, when given, receives per
    patch (in `oof` order) whether each combiner was right."""
    rows, correct = [], {}
    for center, part in oof.groupby("center"):
        rest = oof[oof["center"] != center]
        stacker = fit_stacker(rest, names, seed) if rest["label"].nunique() == 2 else None
        for method in METHODS:
            if method == "stack" and stacker is None:
                continue
            for share, tag in ((None, ""), *(((prior, PRIOR),) if prior else ())):
                score, pred = predict(method, part, names, stacker, share)
                right = pd.Series(pred == part["label"].to_numpy(), index=part.index)
                correct.setdefault(method + suffix + tag, []).append(right)
                prob = probability(method, score)
                rows.append({"method": method + suffix + tag, "center": int(center), "n": len(part),
                             "accuracy": accuracy(part["label"], pred),
                             "brier": brier(part["label"], prob) if prob is not None else float("nan"),
                             "ece": ece(part["label"], prob) if prob is not None else float("nan")})
    if hits is not None:
        hits.update({m: pd.concat(parts).reindex(oof.index).to_numpy() for m, parts in correct.items()})
    return pd.DataFrame(rows)


def _best(means: pd.Series, methods: list[str]) -> str:
    top = max(means[m] for m in methods)
    return next(m for m in methods if means[m] >= top - 1e-12)  # ties: the simpler combiner


def mcnemar_z(a: np.ndarray, b: np.ndarray) -> float:
    """Paired evidence that predictions with hits `a` beat those with hits `b` on the same patches."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 0.0 if only_a + only_b == 0 else float((only_a - only_b) / np.sqrt(only_a + only_b))


def choose(comparison: pd.DataFrame, hits: dict | None = None, z: float = 1.96) -> tuple[str, dict | None]:
    """The combiner and prediction set for the test center (see the module docstring), and the evidence
    between the sets: the best plain and best AdaBN combiner and the paired z of plain over AdaBN (None
    without AdaBN labels). `hits`: per-patch correctness of each label, from `compare_loco`."""
    means = comparison.groupby("method")["accuracy"].mean()
    plain = _best(means, [m for m in METHODS if m in means])
    adabn = [m + ADAPTED for m in METHODS if m + ADAPTED in means]
    if not adabn:
        return plain, None
    if hits is None:
        raise ValueError("choosing between plain and AdaBN predictions needs the per-patch hits")
    best_adabn = _best(means, adabn)
    score = mcnemar_z(hits[plain], hits[best_adabn])
    evidence = {"plain": plain, "adabn": best_adabn, "z_plain_over_adabn": round(score, 3)}
    return (plain if score > z else best_adabn), evidence


def compare_prediction_sets(runs: list[RunDir], folds_csv: Path, cache: Cache, seed: int = 0,
                            prior: float | None = None) -> tuple[dict, pd.DataFrame, dict]:
    """Features of the plain predictions ("") and, when every fold model has them, of the AdaBN ones
    (ADAPTED); the leave-one-center-out comparison of every combiner on each set; per-patch hits."""
    features = {"": build_features(runs, folds_csv, cache)}
    if adapted_ready(runs, cache):
        features[ADAPTED] = build_features(runs, folds_csv, cache, adapted=True)
    hits: dict = {}  # both sets' out-of-fold rows are folds.csv's patches in id order: paired
    comparison = pd.concat([compare_loco(oof, names, seed, suffix, hits, prior)
                            for suffix, (oof, _, names) in features.items()], ignore_index=True)
    return features, comparison, hits


def calibration_means(comparison: pd.DataFrame) -> dict:
    """Mean Brier score and ECE over the held-out centers per combiner (those that give a probability)."""
    if "brier" not in comparison.columns:  # a comparison written before calibration was measured
        return {}
    means = comparison.groupby("method")[["brier", "ece"]].mean().dropna()
    return {m: {"brier": round(float(r["brier"]), 5), "ece": round(float(r["ece"]), 5)} for m, r in means.iterrows()}


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
    label, evidence = choose(comparison[~comparison["method"].str.endswith(PRIOR)], hits)
    matched = prior_choice(comparison, label, prior)
    method, adapted = label.removesuffix(ADAPTED), label.endswith(ADAPTED)
    oof, test, names = features[ADAPTED if adapted else ""]
    stacker = fit_stacker(oof, names, seed) if method == "stack" else None
    used = bool(matched and matched["used"])
    score, pred = predict(method, test, names, stacker, prior if used else None)
    # method: the combiner, "+adabn" on adapted predictions, "@prior" thresholded to the known share
    return {"label": label, "method": label + (PRIOR if used else ""), "adabn": adapted, "evidence": evidence,
            "prior_matching": matched, "names": names, "oof": oof, "test": test, "score": score, "pred": pred}
