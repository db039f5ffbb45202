"""Stage `folds`: every labelled patch gets the fold of its center (leave one center out)."""
from __future__ import annotations

from . import Stage, timed

STAGE = Stage("assign each labelled patch the fold of its center (leave one center out)",
              "work/cache/index.csv", "folds/folds.csv (an existing different one is kept unless --force)",
              flow="work/cache/ -> folds/folds.csv")


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="replace a differing folds.csv (the old one is kept)")


def run(a, paths) -> None:
    from ..data.cache import check_inputs, load_index
    from ..data.folds import write_folds
    from ..safeio import Lock

    check_inputs(paths.input, paths.cache)
    with Lock(paths.folds_csv.with_name(".folds.lock"), f"{paths.folds_csv} (folds)"):
        timed("folds", write_folds, load_index(paths.cache), paths.folds_csv, force=a.force)
