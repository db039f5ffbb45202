"""Per-center metrics: accuracy, AUC and calibration (Brier score, expected calibration error) against
hand computations, and the stack's comparison table carrying them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histoshift.metrics import brier, calibration_bins, ece, per_center, sigmoid
from histoshift.stack.combine import calibration_means, compare_loco, probability


def test_brier_and_ece_match_a_hand_computation():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # (0.1^2 + 0.4^2 + 0.65^2 + 0.2^2) / 4
    assert brier(y, p) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # four bins of one patch each: |0 - 0.1| + |0 - 0.4| + |1 - 0.35| + |1 - 0.8|, over 4 patches
    assert ece(y, p) == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)
    # two patches sharing a bin: their mean probability against their tumour share
    y2, p2 = np.array([0, 1, 1]), np.array([0.62, 0.68, 0.95])
    assert ece(y2, p2) == pytest.approx((2 * abs(0.5 - 0.65) + 1 * abs(1 - 0.95)) / 3)
    bins = calibration_bins(y2, p2)
    assert bins["n"].tolist() == [2, 1] and bins["bin"].tolist() == [6, 9]
    assert ece([1, 1], [1.0, 1.0]) == 0.0 and brier([0, 1], [0.5, 0.5]) == 0.25


def test_per_center_adds_calibration_from_logits_or_probabilities():
    table = pd.DataFrame({"center": [0, 0, 0, 1, 1, 1], "label": [0, 1, 1, 0, 0, 1],
                          "logit": [-2.0, 0.5, 3.0, 1.0, -1.0, 2.0]})
    rows = per_center(table).set_index("center")
    prob = sigmoid(table["logit"])
    for c in (0, 1):
        sel = table["center"] == c
        assert rows.loc[c, "brier"] == pytest.approx(brier(table.loc[sel, "label"], prob[sel]))
        assert rows.loc[c, "ece"] == pytest.approx(ece(table.loc[sel, "label"], prob[sel]))
    assert rows.loc[1, "accuracy"] == pytest.approx(2 / 3)
    as_prob = per_center(table.assign(p=prob), score="p", threshold=0.5).set_index("center")
    pd.testing.assert_series_equal(as_prob["brier"], rows["brier"])


def test_the_stack_comparison_carries_calibration_per_combiner():
    rng = np.random.default_rng(0)
    n = 240
    label = rng.integers(0, 2, n)
    oof = pd.DataFrame({"id": np.arange(n), "center": np.repeat([0, 1, 3, 4], n // 4), "label": label})
    for m in ("a", "b"):
        oof[f"{m}__mean"] = (2 * label - 1) * rng.uniform(0.2, 3, n) + rng.normal(0, 1.5, n)
        oof[f"{m}__spread"] = rng.uniform(0, 1, n)
    comparison = compare_loco(oof, ["a", "b"])
    mean_rows = comparison[comparison["method"] == "mean"].set_index("center")
    for c, part in oof.groupby("center"):
        prob = sigmoid(part[["a__mean", "b__mean"]].mean(axis=1))
        assert mean_rows.loc[c, "brier"] == pytest.approx(brier(part["label"], prob))
        assert mean_rows.loc[c, "ece"] == pytest.approx(ece(part["label"], prob))
    assert comparison.loc[comparison["method"] == "rank", "brier"].isna().all()  # ranks are no probability
    assert comparison.loc[comparison["method"] == "stack", "brier"].between(0, 1).all()
    means = calibration_means(comparison)
    assert set(means) == {"mean", "stack"} and means["mean"]["brier"] == pytest.approx(
        mean_rows["brier"].mean(), abs=1e-5
    )
    assert probability("rank", np.zeros(3)) is None
