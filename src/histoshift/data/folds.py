"""Stage `folds`: leave-one-center-out folds over the labelled centers -> folds/folds.csv.

Fold k holds out center k: a model of fold k trains on every other labelled center and predicts
center k out of fold, exactly as the final models predict the unseen test center. The file is
data, written once: a second run with the same data leaves it alone, and one that would change it
stops instead of overwriting (pass force to replace it; the old file is kept beside it).
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

COLUMNS = ["id", "center", "label", "fold"]


def make_folds(index: pd.DataFrame) -> pd.DataFrame:
    labelled = index[index["split"].isin(["train", "val"])]
    folds = labelled[["id", "center", "label"]].copy()
    folds["fold"] = folds["center"]
    return folds.sort_values("id").reset_index(drop=True)[COLUMNS]


def write_folds(index: pd.DataFrame, path: Path, force: bool = False) -> pd.DataFrame:
    path = Path(path)
    folds = make_folds(index)
    if path.exists():
        old = pd.read_csv(path)
        if list(old.columns) == COLUMNS and old.equals(folds.astype(old.dtypes.to_dict())):
            print(f"folds: {path} is up to date ({len(folds)} patches, folds {sorted(folds.fold.unique())})")
            return old
        if not force:
            raise FileExistsError(
                f"{path} exists and differs from the folds of the current data; "
                "move it away or pass --force (the old file is then kept beside it)")
        backup = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.csv")
        path.rename(backup)
        print(f"folds: kept the previous file as {backup}")
    path.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(path, index=False)
    counts = folds.groupby("fold").size().to_dict()
    print(f"folds: wrote {path}: patches per held-out center {counts}")
    return folds


def read_folds(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no folds file; run the folds stage first")
    df = pd.read_csv(path)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return df
