"""The stack's choice rules: which prediction set goes to the test center (choice.py applies one; `stack --rule`).

A rule sees the candidates the stack compared (`Candidates`): every combiner (sets.METHODS) on every prediction
set (sets.PredictionSet) - plain, adapted (AdaBN, a head's feature shift and self-training), Fourier transfer sets
(beta, donors) and both plain and adapted side by side - with their leave-one-center-out (LOCO) accuracies and
per-patch hits on the labelled centers, and the test center's unlabelled features. It returns a `Pick`: one
candidate's label (a typed sets.Label) and the evidence it used. Within a set the combiner is always the LOCO
best (ties: the simpler one); the rules differ in which set. Prior matching is decided afterwards, the same way
for every rule (choice.prior_choice).

  loco       the original rule: adapted unless plain is significantly better LOCO (McNemar z > 1.96); a
             Fourier set only when significantly better than that (z > 1.96)
  margin     adapted unless LOCO shows plain better by more than MARGIN beyond doubt (the paired 95% interval's
             lower end above one point: paired.py); a Fourier set only when decisively better (interval above 0)
  agreement  the set whose fold models disagree least on the test center's own patches (no label read):
             disagreement between independently trained models tracks their test error (Jiang et al., "Assessing
             Generalization of SGD via Disagreement", ICLR 2022). Deviation: our fold models differ in the centers
             they were trained on, not only in their seed, so the paper's calibration argument does not hold
             exactly; only the order of the sets is used, never the estimate of the error.
  entropy    the set with the lowest mean prediction entropy on the test center (mean combiner's probability;
             entropy minimisation as a model-selection criterion, discussed - and found biased towards
             over-confident models - by Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain
             Adaptation via Soft Neighborhood Density", ICCV 2021)
  rank_both  the rank average of the plain and the adapted predictions of every member together ("rank+both")
  adapted    the adapted set whenever there is one (the limit of `margin` with no veto): a reference

Why a margin: the labelled centers are milder stain shifts than a new hospital, so LOCO under-states what an
adaptation buys on an unseen one. Judged by regret on two unseen centers of the offline proxy (18 cases, 2026-12-07,
docs/benchmarks.md "Which rule ships"): `margin` 0.53 points mean, 1.03 worst; `loco` 1.17 and 4.75 (its
significance veto fired on frozen and mixed sets whose adapted set was 3-4 points better); `agreement` 1.57 / 4.75,
`entropy` 0.55 / 1.17, `rank_both` 0.89 / 2.06; `adapted` picked what `margin` picked in every case.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, ClassVar

import numpy as np
import pandas as pd

from ..paired import Paired, compare
from .combine import mean_score
from .sets import ADAPTED, BOTH, METHODS, PLAIN, Label, PredictionSet

Z = 1.96  # the original rule's McNemar threshold
MARGIN = 0.01  # `margin`: plain must beat adapted LOCO by more than this (a share: one point), beyond doubt


@dataclass(frozen=True)
class Candidates:
    """What the stack compared: `comparison` (compare_loco's rows, the prior-matched ones left out), per-patch
    hits of every label on the out-of-fold patches, and every set's features (PredictionSet -> (oof, test,
    names))."""
    comparison: pd.DataFrame
    hits: dict
    features: dict = field(default_factory=dict)

    @cached_property
    def means(self) -> dict[Label, float]:
        """Each candidate's LOCO accuracy, the mean over the held-out centers."""
        return {k: float(v) for k, v in self.comparison.groupby("label", sort=False)["accuracy"].mean().items()}

    def best(self, pset: PredictionSet) -> Label | None:
        """The LOCO-best combiner on one set (ties: the simpler combiner, METHODS' order); None: no such set."""
        labels = [Label(m, pset) for m in METHODS if Label(m, pset) in self.means]
        if not labels:
            return None
        top = max(self.means[m] for m in labels)
        return next(m for m in labels if self.means[m] >= top - 1e-12)

    def paired(self, a: Label, b: Label) -> Paired:
        if a not in self.hits or b not in self.hits:
            raise ValueError("choosing between prediction sets needs the per-patch hits")
        return compare(self.hits[a], self.hits[b])

    @property
    def fourier(self) -> list[PredictionSet]:
        """The Fourier sets compared, by beta and donors."""
        return sorted({m.pset for m in self.means if m.pset.kind == "fourier"}, key=PredictionSet.order)

    def sets(self) -> list[PredictionSet]:
        """The single prediction sets (not both) in the order ties go: plain, adapted, Fourier."""
        return [s for s in (PLAIN, ADAPTED, *self.fourier) if self.best(s) is not None]


@dataclass(frozen=True)
class Pick:
    label: Label  # the combiner and its set, e.g. Label("mean", ADAPTED)
    evidence: dict = field(default_factory=dict)  # what the rule measured (labels as text: for the decision record)


def _versus(c: Candidates, plain: Label, adapted: Label) -> tuple[Paired, dict]:
    p = c.paired(plain, adapted)
    return p, {"plain": str(plain), "adapted": str(adapted), "z_plain_over_adapted": round(p.z, 3),
               "paired": p.record()}


def _fourier(c: Candidates, pick: Label, evidence: dict, replaces: Callable[[Paired], bool]) -> Pick:
    """The best Fourier set replaces `pick` only when `replaces` says the paired evidence is strong enough."""
    if c.fourier:
        labels = [c.best(s) for s in c.fourier]
        top = max(c.means[m] for m in labels)
        best = next(m for m in labels if c.means[m] >= top - 1e-12)  # ties: the first set
        p = c.paired(best, pick)
        used = replaces(p)
        evidence = evidence | {"fourier": {"fourier": str(best), "against": str(pick),
                                           "z_fourier_over_pick": round(p.z, 3), "used": used, "paired": p.record()}}
        pick = best if used else pick
    return Pick(pick, evidence)


class Rule(ABC):
    """A registered rule: `name` (what `stack --rule` takes), `summary` (one line for the decision record and the
    report)."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def pick(self, c: Candidates) -> Pick: ...


RULES: dict[str, Rule] = {}


def register(cls: type) -> type:
    RULES[cls.name] = cls()
    return cls


@register
class Loco(Rule):
    name, summary = "loco", "adapted unless plain is significantly better leave one center out (McNemar z > 1.96)"

    def pick(self, c: Candidates) -> Pick:
        plain, adapted, evidence = c.best(PLAIN), c.best(ADAPTED), {}
        pick = plain
        if adapted:
            p, evidence["adapted_vs_plain"] = _versus(c, plain, adapted)
            pick = plain if p.z > Z else adapted
        return _fourier(c, pick, evidence, lambda p: p.z > Z)


@register
class Margin(Rule):
    name = "margin"
    summary = f"adapted unless plain is better leave one center out by more than {MARGIN:.0%} beyond doubt"

    def pick(self, c: Candidates) -> Pick:
        plain, adapted, evidence = c.best(PLAIN), c.best(ADAPTED), {"margin": MARGIN}
        pick = plain
        if adapted:
            p, evidence["adapted_vs_plain"] = _versus(c, plain, adapted)
            pick = plain if p.exceeds(MARGIN) else adapted
        return _fourier(c, pick, evidence, lambda p: p.lo > 0)


def _unsupervised(c: Candidates, score: Callable[[pd.DataFrame, list[str]], float], key: str) -> Pick:
    """The set with the lowest `score` on the test center (ties: plain, adapted, Fourier), its LOCO-best combiner."""
    order = c.sets()
    scores = {s: float(score(c.features[s][1], c.features[s][2])) for s in order}
    best = min(scores, key=lambda s: (scores[s], order.index(s)))
    return Pick(c.best(best), {key: {s.name: round(v, 5) for s, v in scores.items()}})


@register
class Agreement(Rule):
    name, summary = "agreement", "the set whose fold models disagree least on the test center (unlabelled)"

    def pick(self, c: Candidates) -> Pick:
        return _unsupervised(c, lambda test, names: test[[f"{n}__disagree" for n in names]].to_numpy().mean(),
                             "test_disagreement")


def mean_entropy(test: pd.DataFrame, names: list[str]) -> float:
    """Mean binary entropy (bits) of the mean combiner's tumour probability over the test patches."""
    p = np.clip(1.0 / (1.0 + np.exp(-mean_score(test, names))), 1e-12, 1 - 1e-12)
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)).mean())


@register
class Entropy(Rule):
    name, summary = "entropy", "the set with the lowest mean prediction entropy on the test center (unlabelled)"

    def pick(self, c: Candidates) -> Pick:
        return _unsupervised(c, mean_entropy, "test_entropy")


@register
class RankBoth(Rule):
    name, summary = "rank_both", "the rank average of the plain and the adapted predictions together"

    def pick(self, c: Candidates) -> Pick:
        if Label("rank", BOTH) in c.means:
            return Pick(Label("rank", BOTH))
        return Pick(c.best(PLAIN), {"note": "no adapted set: the plain set's best combiner"})


@register
class Adapted(Rule):
    name, summary = "adapted", "the adapted set whenever there is one (a reference: margin with no veto)"

    def pick(self, c: Candidates) -> Pick:
        return Pick(c.best(ADAPTED) or c.best(PLAIN))


DEFAULT = "margin"  # chosen by regret on both unseen centers (docs/benchmarks.md, "Which rule ships")
