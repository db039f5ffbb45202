"""The stack stage's computations (stages/stack.py runs them): ensemble the fold models' TTA logits and choose how
to combine them.

Features per ensemble member m (one config and seed, all its folds):
  m__mean      mean logit over the 8 TTA views
  m__spread    standard deviation over the views (how unsure the model is under rotation/flip)
  m__disagree  test center only: the share of pairs of m's fold models that predict different classes (never a
               combiner's input; rules.py's unsupervised criterion)
For labelled patches they come from the one fold model that never saw the patch's center (out of
fold); for the test center they are averaged over the member's fold models. The center id is
never a feature.

Three combiners are evaluated leave-one-center-out on the out-of-fold features:
  mean   average of m__mean over members, threshold 0 (probability 0.5)
  rank   average of per-member percentile ranks, thresholded at the positive rate that `mean`
         predicts on the same patches (ranks carry no threshold of their own)
  stack  LightGBM on all features, trained on the other centers' out-of-fold rows, threshold 0.5
The prediction sets (plain, adapted, Fourier transfer; sets.py) are compared combiner by combiner leave one center
out, and one combiner on one set is chosen: choice.py.
"""
from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from ..data.cache import Cache
from ..data.folds import check_folds, read_folds
from ..lineage import StaleError
from ..metrics import accuracy, brier, ece, sigmoid
from ..tta import check_finite, view_columns
from ..runs import RunDir
from ..errors import HistoshiftError, Missing
from .sets import ADAPTED, METHODS, PLAIN, Label, PredictionSet
# n_jobs=1: LightGBM's own OpenMP pool spins against torch's in the same process; on 2 busy cores a fit of 900
# rows took 1.34 s with its default threads and 0.03 s with one, 135,000 rows x 16 features 11.6 s and 2.2 s
# (2026-12-07, docs/benchmarks.md); the stacker's inputs are a few columns, threads buy little even when idle
LGB_PARAMS = dict(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=20,
                  subsample=0.8, subsample_freq=1, colsample_bytree=1.0, reg_lambda=1.0,
                  deterministic=True, force_row_wise=True, verbose=-1, n_jobs=1)


class StackError(HistoshiftError, ValueError):
    """Predictions the stack stage must not combine (not out of fold, inconsistent across folds)."""


def _views(path: Path, views: int | None = None) -> pd.DataFrame:
    """A TTA file's mean and spread over its views (`views`: the first that many only, e.g. the nearest donors)."""
    if not path.exists():
        raise Missing(f"{path}: missing; run the infer stage first")
    t = check_finite(pd.read_csv(path), str(path))  # NaN must not become a class by accident
    v = t[view_columns(t)[:views]].to_numpy(dtype=float)
    return pd.DataFrame({"id": t["id"], "center": t["center"], "label": t["label"],
                         "mean": v.mean(1), "spread": v.std(1)})


def check_lineage(runs: list[RunDir], cache: Cache, pset: PredictionSet = PLAIN) -> None:
    """Refuse runs trained on another cache and TTA files predicted from another checkpoint or cache (a Fourier
    set: with the settings its files recorded)."""
    for run in runs:
        run.check_inputs(cache.digests)
        settings = run.tta.recorded_settings(pset) if pset.kind == "fourier" else None
        stale = run.tta.stale(cache.id, pset, settings)
        if stale:
            raise StaleError(f"{run.path}: {', '.join(stale)} missing or predicted from another checkpoint or cache; "
                             "run the infer stage")


def build_features(runs: list[RunDir], folds_csv: Path, cache: Cache, pset: PredictionSet = PLAIN
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Out-of-fold features of every labelled patch and averaged features of every test patch, from the prediction
    set `pset`'s files (a Fourier set with `donors`: its first that many views only)."""
    views = pset.donors

    def tta(run: RunDir, part: str) -> Path:
        return run.tta.path(part, pset)

    check_lineage(runs, cache, pset)
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
            part = _views(tta(run, "heldout"), views)
            want = set(folds.loc[folds["fold"] == run.fold, "id"])
            if set(part["id"]) != want or (part["center"] != run.fold).any():
                raise StackError(f"{tta(run, 'heldout')}: ids are not exactly the held-out center {run.fold} "
                                 "of folds.csv: these predictions would not be out of fold")
            parts.append(part)
        member_oof = pd.concat(parts).set_index("id")
        oof[f"{name}__mean"] = member_oof.loc[oof["id"], "mean"].to_numpy()
        oof[f"{name}__spread"] = member_oof.loc[oof["id"], "spread"].to_numpy()
        tests = [_views(tta(r, "test"), views).sort_values("id").reset_index(drop=True) for r in member_runs]
        if test is None:
            test = tests[0][["id", "center"]].copy()
        for t in tests:
            if not np.array_equal(t["id"].to_numpy(), test["id"].to_numpy()):
                raise StackError(f"{name}: fold models predicted different test ids")
        test[f"{name}__mean"] = np.mean([t["mean"] for t in tests], axis=0)
        test[f"{name}__spread"] = np.mean([t["spread"] for t in tests], axis=0)
        test[f"{name}__disagree"] = disagreement(np.stack([t["mean"].to_numpy() > 0 for t in tests]))
    if not names:
        raise Missing("stack: no ensemble member has finished every fold")
    return oof, test, names


def join_sets(plain: tuple, adapted: tuple) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """One set of the plain and the adapted features of every member side by side (an adapted member is named
    `<member>+adapt`): its rank average is the rank average of plain and adapted (rules.py's `rank_both`)."""
    (oof_p, test_p, names), (oof_a, test_a, _) = plain, adapted
    renamed = {c: c.replace("__", ADAPTED.suffix + "__", 1) for c in test_a.columns if "__" in c}
    oof = oof_p.merge(oof_a[["id", *(c for c in renamed if c in oof_a.columns)]].rename(columns=renamed), on="id")
    test = test_p.merge(test_a[["id", *renamed]].rename(columns=renamed), on="id")
    if len(oof) != len(oof_p) or len(test) != len(test_p):
        raise StackError("the plain and the adapted predictions cover different patches")
    return oof, test, [*names, *(n + ADAPTED.suffix for n in names)]


def disagreement(votes: np.ndarray) -> np.ndarray:
    """Per patch, the share of pairs of fold models (rows of `votes`, 0/1) that predict different classes: the
    unsupervised criterion of rules.py (no label is read). One model: 0."""
    k = votes.shape[0]
    if k < 2:
        return np.zeros(votes.shape[1])
    pos = votes.sum(0)
    return pos * (k - pos) / (k * (k - 1) / 2)


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


def compare_loco(oof: pd.DataFrame, names: list[str], seed: int = 0, pset: PredictionSet = PLAIN,
                 hits: dict | None = None, prior: float | None = None) -> pd.DataFrame:
    """Per-center accuracy (and Brier score, ECE) of each combiner on the prediction set `pset`, each center scored
    by a stacker that never saw it; with `prior`, each combiner is also scored thresholded to that positive share
    (its label's `prior`). One row per candidate and center: `label` the typed sets.Label, `method` its text (for
    tables). `hits`, when given, receives per label, per patch (in `oof` order), whether the candidate was right."""
    rows, correct = [], {}
    for center, part in oof.groupby("center"):
        rest = oof[oof["center"] != center]
        stacker = fit_stacker(rest, names, seed) if rest["label"].nunique() == 2 else None
        for method in METHODS:
            if method == "stack" and stacker is None:
                continue
            for share in (None, *((prior,) if prior else ())):
                label = Label(method, pset, prior=share is not None)
                score, pred = predict(method, part, names, stacker, share)
                right = pd.Series(pred == part["label"].to_numpy(), index=part.index)
                correct.setdefault(label, []).append(right)
                prob = probability(method, score)
                rows.append({"label": label, "method": str(label), "center": int(center), "n": len(part),
                             "accuracy": accuracy(part["label"], pred),
                             "brier": brier(part["label"], prob) if prob is not None else float("nan"),
                             "ece": ece(part["label"], prob) if prob is not None else float("nan")})
    if hits is not None:
        hits.update({m: pd.concat(parts).reindex(oof.index).to_numpy() for m, parts in correct.items()})
    return pd.DataFrame(rows)


def comparison_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """compare_loco's rows as comparison.csv and the tables keep them: the typed label's fields as columns (combiner,
    set, prior) beside its text (`method`)."""
    labels = comparison["label"]
    fields = pd.DataFrame({"combiner": [x.combiner for x in labels], "set": [x.pset.name for x in labels],
                           "prior": [x.prior for x in labels]}, index=comparison.index)
    rest = comparison.drop(columns=["label", "method"])
    return pd.concat([comparison[["method"]], fields, rest], axis=1)


def calibration_means(comparison: pd.DataFrame) -> dict:
    """Mean Brier score and ECE over the held-out centers per combiner (those that give a probability)."""
    if "brier" not in comparison.columns:  # a comparison written before calibration was measured
        return {}
    means = comparison.groupby("method")[["brier", "ece"]].mean().dropna()
    return {m: {"brier": round(float(r["brier"]), 5), "ece": round(float(r["ece"]), 5)} for m, r in means.iterrows()}
