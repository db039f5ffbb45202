"""The stack stage's choice (stages/stack.py writes it): which prediction set and which combiner (stack.py's
`mean`, `rank`, `stack`) go to the test center.

The prediction sets (typed: sets.PredictionSet): plain (8 dihedral views); adapted (`infer --adapt`, a fine-tuned
backbone's batch-norm statistics, a head's feature shift and self-training, re-done on each center from its
unlabelled patches); Fourier transfer (`infer --fourier`, each patch given the low-frequency amplitudes of its n
nearest donors of other training centers, the first n of the set's donor views - so the number of donors is chosen
here, and beta by which set); and, with adapted predictions, both plain and adapted side by side. Every combiner on
every set is scored leave one center out (LOCO) on the out-of-fold patches; a rule (rules.py, `stack --rule`,
default rules.DEFAULT) then picks the set. The default was chosen by its regret on two unseen centers (the best
candidate there minus what shipped), not by LOCO: the labelled centers are milder stain shifts than a new hospital,
and LOCO vetoes of the adapted set cost up to 4.75 points (docs/benchmarks.md, "Which rule ships"). The decision
record (stack.folder.StackChoice) keeps the rule, its evidence, and what every other rule would have picked.

Prior matching: the competition's test center is exactly balanced. Each combiner is also scored thresholded so that
that share of patches is predicted positive (a label's `prior`, rendered `mean@prior`; the labelled centers are
balanced as well); the chosen combiner is thresholded that way on the test center only when this raises its mean
per-center accuracy leave-one-center-out (the choice's `prior_matching`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.cache import Cache
from ..data.donors import donor_counts
from ..runs import RunDir
from .rules import DEFAULT, RULES, Candidates
from .combine import build_features, compare_loco, fit_stacker, join_sets, predict
from .sets import ADAPTED, BOTH, PLAIN, Label, PredictionSet


def adapted_ready(runs: list[RunDir], cache: Cache) -> bool:
    """Every fold model has fresh adapted predictions, and the adaptation changed something in at least
    one of them (a set equal to the plain one is not a second set)."""
    if not all(r.tta.fresh(cache.id, ADAPTED) for r in runs):
        return False
    return any(r.tta.adapted_layers() > 0 for r in runs)



def fourier_sets(runs: list[RunDir], cache: Cache) -> list[PredictionSet]:
    """Every Fourier set (beta) that each fold model has, fresh and predicted with the same settings, once per number
    of donors tried (data.donors.donor_counts), by beta and donors."""
    have = None
    for run in runs:
        sets = set(run.tta.fourier_sets())
        have = sets if have is None else have & sets
    out = []
    for files in sorted(have or (), key=PredictionSet.order):
        settings = [run.tta.recorded_settings(files) for run in runs]
        if any(s is None or s != settings[0] for s in settings):
            continue
        if not all(run.tta.fresh(cache.id, files, s) for run, s in zip(runs, settings)):
            continue
        out += [PredictionSet.fourier(files.beta, n) for n in donor_counts(int(settings[0]["donors"]))]
    return out


def compare_prediction_sets(runs: list[RunDir], folds_csv: Path, cache: Cache, seed: int = 0,
                            prior: float | None = None) -> tuple[dict, pd.DataFrame, dict]:
    """Features (PredictionSet -> (oof, test, names)) of the plain predictions, and, when every fold model has them,
    of the adapted ones and of both side by side, and of each Fourier set and number of donors; the
    leave-one-center-out comparison of every combiner on each set (combine.compare_loco's rows); per-patch hits
    (Label -> hits)."""
    features = {PLAIN: build_features(runs, folds_csv, cache)}
    if adapted_ready(runs, cache):
        features[ADAPTED] = build_features(runs, folds_csv, cache, ADAPTED)
        features[BOTH] = join_sets(features[PLAIN], features[ADAPTED])
    for pset in fourier_sets(runs, cache):
        features[pset] = build_features(runs, folds_csv, cache, pset)
    hits: dict = {}  # every set's out-of-fold rows are folds.csv's patches in id order: paired
    comparison = pd.concat([compare_loco(oof, names, seed, pset, hits, prior)
                            for pset, (oof, _, names) in features.items()], ignore_index=True)
    return features, comparison, hits


def prior_choice(comparison: pd.DataFrame, label: Label, prior: float | None) -> dict | None:
    """Whether to threshold the chosen combiner to the known positive share: only when that raises
    its mean per-center accuracy leave-one-center-out (the labelled centers are balanced too)."""
    if not prior:
        return None
    means = comparison.groupby("label", sort=False)["accuracy"].mean()
    without, with_prior = float(means[label]), float(means[label.matched()])
    return {"share": prior, "loco_without": round(without, 5), "loco_with": round(with_prior, 5),
            "used": with_prior > without + 1e-12}


def candidates(features: dict, comparison: pd.DataFrame, hits: dict) -> Candidates:
    """What a rule chooses from: the compared sets without their prior-matched variants."""
    return Candidates(comparison[[not label.prior for label in comparison["label"]]], hits, features)


@dataclass(frozen=True)
class Decision:
    """The stack's decision as a typed record (the stage turns it into stack.folder.StackChoice, the benchmarks score
    it): the pick and its evidence, and the test center's scores and 0/1 predictions."""
    label: Label  # the picked candidate: combiner and prediction set, e.g. Label("mean", ADAPTED)
    shipped: Label  # what ships: the label, thresholded to the known positive share (`prior`) when that is used
    rule: str
    rule_evidence: dict  # what the rule measured
    rule_picks: dict  # rule -> the Label it would have picked
    evidence: dict | None  # the paired plain-vs-adapted comparison, LOCO, whatever the rule
    fourier: dict | None  # the best Fourier set against the pick
    prior_matching: dict | None
    names: list  # the members (the stack's feature names' prefixes)
    oof: pd.DataFrame  # the chosen set's out-of-fold features
    test: pd.DataFrame  # and the test center's
    score: np.ndarray  # the test center's scores
    pred: np.ndarray  # and 0/1 predictions


def decide(features: dict, comparison: pd.DataFrame, hits: dict, prior: float | None, seed: int = 0,
           rule: str = DEFAULT) -> Decision:
    """The stack stage's decision, a pure function of the compared prediction sets (`compare_prediction_sets`):
    the combiner and prediction set (`rule`'s pick, rules.py), what every rule would have picked, whether prior
    matching is used, and the test center's scores and 0/1 predictions. The stage writes it; the accuracy
    benchmark scores it."""
    if rule not in RULES:
        raise ValueError(f"unknown choice rule {rule!r}; one of {', '.join(RULES)}")
    c = candidates(features, comparison, hits)
    picks = {name: r.pick(c) for name, r in RULES.items()}
    label, evidence = picks[rule].label, picks[rule].evidence
    matched = prior_choice(comparison, label, prior)
    oof, test, names = features[label.pset]
    stacker = fit_stacker(oof, names, seed) if label.combiner == "stack" else None
    used = bool(matched and matched["used"])
    score, pred = predict(label.combiner, test, names, stacker, prior if used else None)
    versus = picks["loco"].evidence.get("adapted_vs_plain")  # the paired plain-vs-adapted evidence, whatever the rule
    return Decision(label=label, shipped=label.matched() if used else label, rule=rule, rule_evidence=evidence,
                    rule_picks={name: p.label for name, p in picks.items()}, evidence=versus,
                    fourier=evidence.get("fourier"), prior_matching=matched, names=names, oof=oof, test=test,
                    score=score, pred=pred)
