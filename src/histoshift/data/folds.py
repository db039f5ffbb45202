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

from ..errors import Exists, HistoshiftError, Missing
from ..safeio import write_csv
from .splits import labelled

COLUMNS = ["id", "center", "label", "fold"]


class FoldsError(HistoshiftError, ValueError):
    """folds.csv is malformed or does not match the cache (stale ids, wrong labels, a center leak)."""


def make_folds(index: pd.DataFrame) -> pd.DataFrame:
    folds = labelled(index)[["id", "center", "label"]].copy()
    folds["fold"] = folds["center"]
    return folds.sort_values("id").reset_index(drop=True)[COLUMNS]


def write_folds(index: pd.DataFrame, path: Path, force: bool = False) -> pd.DataFrame:
    path = Path(path)
    folds = make_folds(index)
    if path.exists():
        old = pd.read_csv(path)
        if list(old.columns) == COLUMNS and old.equals(folds.astype(old.dtypes.to_dict())):
            print(
                f"folds: {path} is up to date ({len(folds)} patches, folds "
                f"{sorted(int(f) for f in folds.fold.unique())})"
            )
            return old
        if not force:
            raise Exists(
                f"{path} exists and differs from the folds of the current data; "
                "move it away or pass --force (the old file is then kept beside it)")
        backup = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.csv")
        path.rename(backup)
        print(f"folds: kept the previous file as {backup}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, folds)
    counts = {int(k): int(v) for k, v in folds.groupby("fold").size().items()}
    print(f"folds: wrote {path}: patches per held-out center {counts}")
    return folds


def read_folds(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise Missing(f"{path}: no folds file; run the folds stage first")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FoldsError(f"{path}: cannot be read as CSV ({str(e).strip().splitlines()[0]})") from None
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise FoldsError(f"{path}: missing columns {sorted(missing)}")
    for col in COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            k = int(bad.to_numpy().argmax())
            raise FoldsError(f"{path}, row {k + 2}: {col} is {df[col].iloc[k]!r}, expected an integer")
        df[col] = values.astype("int64")
    return df


def check_folds(folds: pd.DataFrame, index: pd.DataFrame, path: Path) -> None:
    """Refuse (FoldsError) folds that do not describe leave-one-center-out over the cache's labelled
    patches: every labelled id exactly once, its center and label as cached, its fold its center. A
    hand edit that moves patches of a center into another fold would let fold models train on the
    center they are scored on (and the stack stage trust those scores)."""
    dup = folds["id"][folds["id"].duplicated()]
    if len(dup):
        raise FoldsError(f"{path}, id {int(dup.iloc[0])}: listed more than once")
    merged = labelled(index)[["id", "center", "label"]].merge(
        folds, on="id", how="outer", suffixes=("", "_folds"), indicator=True
    )
    for side, problem in (("left_only", "is a labelled patch of the cache but has no fold"),
                          ("right_only", "is not a labelled patch of the cache")):
        rows = merged[merged["_merge"] == side]
        if len(rows):
            raise FoldsError(f"{path}, id {int(rows['id'].iloc[0])}: {problem} ({len(rows)} such ids); the folds "
                             "are stale: rebuild them (folds --force)")
    for col in ("center", "label"):
        bad = merged[merged[col] != merged[f"{col}_folds"]]
        if len(bad):
            r = bad.iloc[0]
            raise FoldsError(f"{path}, id {int(r['id'])}: {col} {int(r[f'{col}_folds'])} differs from the cache's "
                             f"{int(r[col])}; rebuild the folds (folds --force)")
    leak = merged[merged["fold"] != merged["center"]]
    if len(leak):
        r = leak.iloc[0]
        raise FoldsError(
            f"{path}, id {int(r['id'])}: center {int(r['center'])} placed in fold {int(r['fold'])}; leave-one-"
            "center-out needs fold = center, else a fold model is scored on patches of a center it trained "
            f"on ({len(leak)} such ids); rebuild the folds (folds --force)"
        )
