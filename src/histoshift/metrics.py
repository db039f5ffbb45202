"""Metrics that know about centers: accuracy and AUC per center, with the worst center beside the mean."""
from __future__ import annotations

import numpy as np
import pandas as pd
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


def per_center(table: pd.DataFrame, score: str = "logit", threshold: float = 0.0) -> pd.DataFrame:
    """table: center, label and a score column (logits: threshold 0) -> one row per center."""
    rows = []
    for center, part in table.groupby("center"):
        pred = (part[score].to_numpy() > threshold).astype(int)
        rows.append({"center": int(center), "n": len(part), "accuracy": accuracy(part["label"], pred),
                     "auc": auc(part["label"], part[score])})
    return pd.DataFrame(rows)
