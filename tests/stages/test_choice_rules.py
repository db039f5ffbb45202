"""Paired evidence (paired.py) against hand-computed cases, and every choice rule (rules.py) on constructed prediction
sets whose right pick is known - among them the case that motivated the rules: leave one center out favours the
plain set, the unseen center the adapted one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histoshift.stack.choice import decide
from histoshift.paired import compare, mcnemar_z
from histoshift.stack.rules import DEFAULT, MARGIN, RULES, Candidates
from histoshift.stack.combine import compare_loco, join_sets, rank_predict
from histoshift.stack.sets import ADAPTED, BOTH, PLAIN, Label


def test_paired_difference_and_interval_by_hand():
    a = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    b = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    p = compare(a, b)
    # d = a - b: three +1, one -1, six 0; mean 0.2; sample variance 3.6 / 9 = 0.4; se = sqrt(0.4 / 10) = 0.2
    assert (p.n, p.clusters, p.only_a, p.only_b) == (10, 10, 3, 1)
    assert (p.acc_a, p.acc_b, p.diff) == pytest.approx((0.6, 0.4, 0.2))
    assert (p.lo, p.hi) == pytest.approx((0.2 - 1.959964 * 0.2, 0.2 + 1.959964 * 0.2), abs=1e-6)
    assert p.z == pytest.approx(2 / np.sqrt(4)) == mcnemar_z(a, b)
    assert not p.decisive and not p.exceeds(0.0)
    assert p.text() == "+20.0 points (95% CI -19.2 to +59.2, not decisive; n=10)"
    assert p.record()["decisive"] is False and p.record()["diff"] == 0.2


def test_the_same_patches_under_several_seeds_are_one_cluster():
    a = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    b = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    ids = np.arange(10)
    once = compare(a, b)
    thrice = compare(np.tile(a, 3), np.tile(b, 3), clusters=np.tile(ids, 3))
    # D_g = 3 d_g, N_g = 3: var = 10/9 * 9 sum (d_g - 0.2)^2 / 900 = the single copy's: no evidence is invented
    assert (thrice.n, thrice.clusters) == (30, 10)
    assert (thrice.diff, thrice.lo, thrice.hi) == pytest.approx((once.diff, once.lo, once.hi))
    naive = compare(np.tile(a, 3), np.tile(b, 3))  # as if 30 independent patches: narrower, wrongly
    assert naive.hi - naive.lo < 0.6 * (thrice.hi - thrice.lo)


def test_decisive_identical_and_mismatched_sets():
    right = np.ones(100, dtype=bool)
    worse = right.copy()
    worse[:30] = False
    p = compare(right, worse)
    assert p.decisive and p.lo > 0.2 and p.exceeds(MARGIN) and p.diff == pytest.approx(0.3)
    q = compare(worse, right)
    assert q.decisive and q.hi < 0 and not q.exceeds(MARGIN)
    same = compare(right, right)
    assert (same.diff, same.lo, same.hi, same.z, same.decisive) == (0.0, 0.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="same observations"):
        compare(right, right[:50])
    with pytest.raises(ValueError, match="cluster key"):
        compare(right, right, clusters=np.arange(5))


def _sets(seed: int = 0, n_center: int = 300, n_test: int = 600, plain_oof_wrong=0.02, adapted_oof_wrong=0.035,
          plain_test_wrong=0.30, adapted_test_wrong=0.10, disagree=(0.3, 0.05)):
    """Features of two members in two prediction sets, built so that each set's errors are known: out of fold
    (four labelled centers) and on the test center. Both members are the same model (no ensemble gain)."""
    rng = np.random.default_rng(seed)
    centers = np.repeat([0, 1, 3, 4], n_center)
    n = len(centers)
    label = rng.integers(0, 2, n)
    test_label = np.tile([0, 1], n_test // 2)
    order = rng.permutation(n)  # disjoint error sets: plain wrong on the first, adapted on the next
    wrong = {PLAIN: order[:int(plain_oof_wrong * n)],
             ADAPTED: order[int(plain_oof_wrong * n):int((plain_oof_wrong + adapted_oof_wrong) * n)]}
    test_order = rng.permutation(n_test)
    test_wrong = {
        PLAIN: test_order[: int(plain_test_wrong * n_test)],
        ADAPTED: test_order[: int(adapted_test_wrong * n_test)],
    }
    features = {}
    for k, (pset, d) in enumerate(zip((PLAIN, ADAPTED), disagree)):
        sign = label * 2 - 1.0
        sign[wrong[pset]] *= -1
        tsign = test_label * 2 - 1.0
        tsign[test_wrong[pset]] *= -1
        scale = 0.3 if pset == PLAIN else 3.0  # plain: unsure (high entropy); adapted: confident
        oof = pd.DataFrame({"id": np.arange(n), "center": centers, "label": label})
        test = pd.DataFrame({"id": np.arange(10_000, 10_000 + n_test), "center": 2})
        for m in ("a/seed0", "b/seed0"):
            oof[f"{m}__mean"] = sign * (1 + rng.random(n))
            oof[f"{m}__spread"] = 0.1
            test[f"{m}__mean"] = tsign * scale * (1 + rng.random(n_test))
            test[f"{m}__spread"] = 0.1
            test[f"{m}__disagree"] = d
        features[pset] = (oof, test, ["a/seed0", "b/seed0"])
    features[BOTH] = join_sets(features[PLAIN], features[ADAPTED])
    hits: dict = {}
    comparison = pd.concat([compare_loco(o, names, 0, s, hits) for s, (o, _, names) in features.items()],
                           ignore_index=True)
    return features, comparison, hits, test_label


def _shipped(rule: str, features, comparison, hits, test_label) -> tuple[Label, float]:
    d = decide(features, comparison, hits, prior=None, rule=rule)
    return d.label, float((d.pred == test_label).mean())


def test_loco_favours_plain_the_unseen_center_adapted_and_the_margin_rule_ships_adapted():
    features, comparison, hits, y = _sets()
    c = Candidates(comparison, hits, features)
    p = c.paired(c.best(PLAIN), c.best(ADAPTED))  # plain better out of fold: 1.5 points, significant, < a point sure
    assert p.diff == pytest.approx(0.015) and p.z > 1.96 and 0 < p.lo < MARGIN
    loco, loco_acc = _shipped("loco", features, comparison, hits, y)
    margin, margin_acc = _shipped("margin", features, comparison, hits, y)
    assert loco.pset == PLAIN and margin.pset == ADAPTED
    assert loco_acc == pytest.approx(0.70) and margin_acc == pytest.approx(0.90)  # regret 20 points and 0
    # a larger out-of-fold loss, beyond the margin for sure, vetoes the adapted set under both rules
    features, comparison, hits, y = _sets(adapted_oof_wrong=0.08)
    c = Candidates(comparison, hits, features)
    assert c.paired(c.best(PLAIN), c.best(ADAPTED)).exceeds(MARGIN)
    assert _shipped("margin", features, comparison, hits, y)[0].pset == PLAIN
    assert _shipped("loco", features, comparison, hits, y)[0].pset == PLAIN


def test_unsupervised_rules_read_only_the_test_center():
    features, comparison, hits, y = _sets()  # adapted: fold models agree (0.05 vs 0.3), confident
    for rule in ("agreement", "entropy"):
        pick = RULES[rule].pick(Candidates(comparison, hits, features))
        assert pick.label.pset == ADAPTED, rule
    assert RULES["agreement"].pick(Candidates(comparison, hits, features)).evidence["test_disagreement"] == \
        {"plain": 0.3, "adapt": 0.05}
    features, comparison, hits, y = _sets(disagree=(0.05, 0.3))  # now the plain set's fold models agree
    assert RULES["agreement"].pick(Candidates(comparison, hits, features)).label.pset == PLAIN
    # labels of the test center are never an input: the same features with other test labels pick the same
    assert _shipped("agreement", features, comparison, hits, y)[0] == _shipped("agreement", features, comparison, hits,
                                                                                1 - y)[0]


def test_rank_both_ranks_plain_and_adapted_together_and_adapted_is_the_reference():
    features, comparison, hits, y = _sets()
    label, acc = _shipped("rank_both", features, comparison, hits, y)
    assert label == Label("rank", BOTH) and str(label) == "rank+both"
    oof, test, names = features[BOTH]
    assert names == ["a/seed0", "b/seed0", "a/seed0+adapt", "b/seed0+adapt"]
    _, pred = rank_predict(test, names)
    assert acc == pytest.approx(float((pred == y).mean()))
    assert _shipped("adapted", features, comparison, hits, y)[0].pset == ADAPTED
    # without adapted predictions every rule falls back to the plain set's best combiner
    plain_only = comparison[[label.pset == PLAIN for label in comparison["label"]]]
    c = Candidates(plain_only, {k: v for k, v in hits.items() if k.pset == PLAIN}, {PLAIN: features[PLAIN]})
    assert {name: r.pick(c).label for name, r in RULES.items()} == {name: c.best(PLAIN) for name in RULES}


def test_decide_names_the_rule_and_every_rules_pick():
    features, comparison, hits, y = _sets()
    d = decide(features, comparison, hits, prior=None)
    assert d.rule == DEFAULT and set(d.rule_picks) == set(RULES)
    assert d.label == d.rule_picks[DEFAULT]
    assert d.evidence["paired"]["diff"] == pytest.approx(0.015)  # the plain-vs-adapted record, whatever the rule
    with pytest.raises(ValueError, match="unknown choice rule"):
        decide(features, comparison, hits, prior=None, rule="oracle")


def test_fold_model_disagreement_by_hand():
    from histoshift.stack.combine import disagreement

    votes = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=bool)  # 4 fold models x 4 patches
    # patch 0: two say 1, two say 0 -> 4 of 6 pairs differ; patch 1: none; patch 2: one against three -> 3 of 6
    assert disagreement(votes).tolist() == pytest.approx([4 / 6, 0.0, 0.5, 0.0])
    assert disagreement(votes[:1]).tolist() == [0.0] * 4


def test_worst_case_interval_of_two_accuracies_by_hand():
    from histoshift.paired import worst_case

    # 0.843 vs 0.838 on 1,454 patches: discordance at most 0.157 + 0.162 = 0.319, var <= (0.319 - 0.005^2) / 1454
    lo, hi = worst_case(0.843, 0.838, 1454)
    half = 1.959964 * np.sqrt((0.319 - 0.005 ** 2) / 1454)
    assert (lo, hi) == pytest.approx((0.005 - half, 0.005 + half), abs=1e-6) and lo < 0 < hi
    assert worst_case(0.858, 0.720, 1454)[0] > 0.1  # +13.8 points: decisive whatever the discordance
    # no measured paired interval of the same accuracies can be wider
    a = np.ones(1000, dtype=bool)
    b = np.ones(1000, dtype=bool)
    a[:200], b[200:450] = False, False  # 0.80 vs 0.75, errors disjoint (discordance 0.45): the worst case itself
    p = compare(a, b)
    assert (p.lo, p.hi) == pytest.approx(worst_case(0.80, 0.75, 1000), abs=2e-4)


def test_stack_help_names_every_registered_rule_and_the_default(capsys):
    from histoshift.cli import main

    with pytest.raises(SystemExit):
        main(["stack", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in RULES:
        assert name in text, name
    assert f"{DEFAULT} (the default" in text


def test_an_unknown_rule_stops_the_stack_stage_in_one_line(tmp_path, capsys):
    from histoshift.cli import main

    assert main(["--root", str(tmp_path), "stack", "--rule", "oracle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rule oracle" in err[0] and "margin" in err[0]
