"""Which patches a fold trains on, holds out and adapts to, and the pseudo-labelled test patches of a
second round. Every split filter of the package is written here, once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import Missing
from ..lineage import StaleError
from ..stack.folder import StackDir
from .cache import Cache


def labelled(index: pd.DataFrame) -> pd.DataFrame:
    """Rows with labels (train.h5 and val.h5)."""
    return index[index["split"] != "test"]


def test_rows(index: pd.DataFrame, usable: bool = False) -> pd.DataFrame:
    """The test center's rows (`usable`: without the aberrant patches)."""
    rows = index[index["split"] == "test"]
    return rows[~rows["aberrant"]] if usable else rows


def heldout_rows(index: pd.DataFrame, center: int) -> pd.DataFrame:
    """Every labelled patch of one center (aberrant ones included: they are predicted and scored)."""
    lab = labelled(index)
    return lab[lab["center"] == center]


def training_rows(index: pd.DataFrame, center: int) -> pd.DataFrame:
    """The labelled rows a center-wise fold trains on: every other labelled center, no aberrant patch."""
    lab = labelled(index)
    return lab[(lab["center"] != center) & ~lab["aberrant"]].reset_index(drop=True)


def split_for_fold(index: pd.DataFrame, folds: pd.DataFrame, fold: int):
    """Labelled training rows, held-out rows and unlabelled target rows of one fold."""
    lab = labelled(index).merge(folds[["id", "fold"]], on="id", how="left")
    if lab["fold"].isna().any():
        missing = lab.loc[lab["fold"].isna(), "id"].head(3).tolist()
        raise ValueError(f"folds file does not match the cache: ids {missing} have no fold; rebuild the folds")
    if fold not in set(lab["fold"]):
        raise ValueError(f"fold {fold} does not exist (folds: {sorted(int(f) for f in lab['fold'].unique())})")
    source = lab[(lab["fold"] != fold) & ~lab["aberrant"]]
    heldout = lab[lab["fold"] == fold]
    target = pd.concat([heldout, test_rows(index)])
    target = target[~target["aberrant"]]
    return source.reset_index(drop=True), heldout.reset_index(drop=True), target.reset_index(drop=True)


def in_sample(index: pd.DataFrame, fold: int, per_center: int) -> pd.DataFrame:
    """The training centers of a fold for its summary: a fixed sample of at most `per_center` labelled
    patches of each (in sample, for reference only; the held-out center is scored out of fold)."""
    parts = [part.sample(min(len(part), per_center), random_state=0)
             for c, part in labelled(index).groupby("center") if c != fold]
    return pd.concat(parts).reset_index(drop=True)


def pseudo_source(cache: Cache, stack_dir: Path) -> Path:
    """The previous round's test features, after checking they were computed from this cache."""
    stack = StackDir(Path(stack_dir))
    path, made_from = stack.test_features, stack.cache_id()
    if not path.exists() or made_from is None:
        raise Missing(f"{path}: pseudo-labels need a finished first round (train, infer, stack)")
    if made_from != cache.id:
        raise StaleError(f"{path}: computed from another cache ({made_from}, now {cache.id}); rerun the first round's "
                         "infer and stack before pseudo-labelling")
    return path


def pseudo_labels(cache: Cache, threshold: float, stack_dir: Path) -> pd.DataFrame:
    """Confident test patches of the previous round's ensemble, as labelled rows (one round)."""
    feats = pd.read_csv(pseudo_source(cache, stack_dir))
    prob = 1 / (1 + np.exp(-feats[[c for c in feats.columns if c.endswith("__mean")]].mean(axis=1)))
    sure = feats.assign(label=(prob >= 0.5).astype(int))[(prob >= threshold) | (prob <= 1 - threshold)]
    return test_rows(cache.index, usable=True).drop(columns="label").merge(sure[["id", "label"]], on="id")
