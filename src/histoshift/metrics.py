"""Metrics that know about centers: accuracy, AUC and calibration (Brier score, expected calibration error)
per center, with the worst center beside the mean."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.metrics import roc_auc_score


def accuracy(labels, pred) -> float:
    labels, pred = np.asarray(labels), np.asarray(pred)
    return float((labels == pred).mean()) if len(labels) else float("nan")


def logit_accuracy(table: pd.DataFrame, columns: list[str]) -> float:
    """Accuracy of the mean of some logit columns (e.g. TTA views), thresholded at 0, against `label`."""
    return accuracy(table["label"], (table[columns].mean(axis=1) > 0).astype(int))


def auc(labels, scores) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores)))


ECE_BINS = 10


def sigmoid(x) -> np.ndarray:
    return expit(np.asarray(x, dtype=np.float64))  # no overflow warning for large logits


def brier(labels, prob) -> float:
    """Mean squared error of the tumour probability (0 is perfect, 0.25 is a constant 0.5)."""
    labels, prob = np.asarray(labels, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    return float(((prob - labels) ** 2).mean()) if len(labels) else float("nan")


def calibration_bins(labels, prob, bins: int = ECE_BINS) -> pd.DataFrame:
    """Equal-width bins of the predicted tumour probability: patches, mean probability and observed
    tumour share per non-empty bin (the reliability diagram's points)."""
    labels, prob = np.asarray(labels, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    which = np.clip((prob * bins).astype(int), 0, bins - 1)  # [0, 1/bins), ..., [1 - 1/bins, 1]
    rows = [{"bin": b, "n": int(sel.sum()), "mean_prob": float(prob[sel].mean()), "share": float(labels[sel].mean())}
            for b in range(bins) if (sel := which == b).any()]
    return pd.DataFrame(rows, columns=["bin", "n", "mean_prob", "share"])


def ece(labels, prob, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the tumour probability: sum over equal-width bins of
    (patches in the bin / patches) x |observed tumour share - mean predicted probability|."""
    table = calibration_bins(labels, prob, bins)
    if not len(table):
        return float("nan")
    return float((table["n"] * (table["share"] - table["mean_prob"]).abs()).sum() / table["n"].sum())


def per_center(table: pd.DataFrame, score: str = "logit", threshold: float = 0.0) -> pd.DataFrame:
    """table: center, label and a score column -> one row per center: accuracy, AUC, Brier, ECE. A score
    thresholded at 0 is a logit (its probability is the sigmoid); at 0.5, already a probability."""
    rows = []
    for center, part in table.groupby("center"):
        values = part[score].to_numpy()
        pred = (values > threshold).astype(int)
        prob = sigmoid(values) if threshold == 0.0 else values
        rows.append({"center": int(center), "n": len(part), "accuracy": accuracy(part["label"], pred),
                     "auc": auc(part["label"], values), "brier": brier(part["label"], prob),
                     "ece": ece(part["label"], prob)})
    return pd.DataFrame(rows)
