"""Stage `submit`: write submissions/submission.csv (ID,Pred) after checking it against test.h5.

An existing submission is never overwritten silently: the new one is written completely under a
temporary name first, then the old one is renamed with its modification time
(submission.YYYYmmdd-HHMMSS.csv, printed) and the new one takes its place; a failed write (a full
disk) leaves the old submission where it was. A submission that predicts one class for the whole test
center is refused unless `allow_degenerate` (the test center is balanced: that is a broken model).
With `kaggle` (submit --kaggle SLUG) the checked file is uploaded first and placed only if Kaggle took it.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..errors import HistoshiftError
from ..stack.folder import CHOICE
from . import Stage, timed

STAGE = Stage("write the submission after checking it against test.h5's ids",
              f"work/stack/test_scores.csv, work/stack/{CHOICE}, input/test.h5, work/cache/manifest.json",
              "submissions/submission.csv (the previous one is kept as submission.<time>.csv)",
              flow="work/stack/, input/test.h5 -> submissions/submission.csv")


def arguments(p) -> None:
    p.add_argument("--allow-degenerate", action="store_true",
                   help="write a submission that predicts one class for every test patch (refused otherwise)")
    p.add_argument("--kaggle", default=None, metavar="SLUG",
                   help="also upload it to this Kaggle competition with the official client, its message built "
                        "from the lineage; the local file is placed only once Kaggle took it (never without this)")


def run(a, paths) -> None:
    timed("submit", write_submission, paths.stack / "test_scores.csv", paths.input / "test.h5", paths.submissions,
          allow_degenerate=a.allow_degenerate, cache_dir=paths.cache, kaggle=a.kaggle, runs_dir=paths.runs)


class SubmissionError(HistoshiftError, ValueError):
    """A submission that must not be written or uploaded."""


def check_submission(sub, test_ids: list[int], source: str = "submission") -> None:
    """Raise SubmissionError unless `sub` has exactly columns ID,Pred, one row per test id, Pred in {0,1}."""
    if list(sub.columns) != ["ID", "Pred"]:
        raise SubmissionError(f"{source}: columns are {list(sub.columns)}, expected ['ID', 'Pred']")
    if sub["ID"].isna().any() or sub["Pred"].isna().any():
        raise SubmissionError(f"{source}: empty cells")
    try:
        ids = sub["ID"].astype("int64")
    except (TypeError, ValueError):
        raise SubmissionError(f"{source}: ID values must be integers") from None
    dup = ids[ids.duplicated()]
    if len(dup):
        raise SubmissionError(f"{source}: duplicate ID {int(dup.iloc[0])} ({len(dup)} duplicates)")
    bad = sub.loc[~sub["Pred"].isin([0, 1]), "ID"]
    if len(bad):
        raise SubmissionError(f"{source}: Pred must be 0 or 1; ID {bad.iloc[0]} has {sub.loc[bad.index[0], 'Pred']!r}")
    want, have = set(test_ids), set(ids)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise SubmissionError(f"{source}: {len(missing)} test ids missing (e.g. {missing[:3]}), "
                              f"{len(extra)} ids not in test.h5 (e.g. {extra[:3]})")


def check_scores_current(scores_csv: Path, test_h5: Path, cache_dir: Path, runs_dir: Path | None = None) -> None:
    """Refuse test scores that the stack computed from another cache, or a test.h5 changed since the cache was
    built (the ids may match while the images do not), or (with `runs_dir`) from checkpoints retrained or removed
    since: the rules the report stage applies."""
    from ..data.cache import check_inputs
    from ..lineage import digest_file
    from ..runs import find_runs
    from ..stack.folder import StackDir

    current = check_inputs(Path(test_h5).parent, cache_dir)["cache_id"]
    checkpoints = None  # without a runs folder: the scores' cache only
    if runs_dir is not None:
        runs = find_runs(Path(runs_dir)) if Path(runs_dir).is_dir() else []
        checkpoints = {r.name: digest_file(r.checkpoint) for r in runs if r.checkpoint.is_file()}
    StackDir(Path(scores_csv).parent).require_current(current, checkpoints, "before submitting")


def write_submission(scores_csv: Path, test_h5: Path, out_dir: Path, allow_degenerate: bool = False,
                     cache_dir: Path | None = None, kaggle: str | None = None, runs_dir: Path | None = None) -> Path:
    """`cache_dir`: check the scores' lineage against it first (the CLI always does). `kaggle`: a competition
    slug to upload to after the checks (kaggle_upload.py); the local file is placed only once Kaggle took it."""
    from ..kaggle_upload import check_slug
    from ..safeio import Lock

    out_dir = Path(out_dir)
    if kaggle:
        check_slug(kaggle)
    with Lock(out_dir / ".lock", f"the submissions folder {out_dir}"):
        if cache_dir is not None:
            check_scores_current(scores_csv, test_h5, cache_dir, runs_dir)
        sub = _checked(scores_csv, test_h5, allow_degenerate)
        if kaggle:
            _upload(sub, Path(scores_csv).parent, kaggle)
        return _place(sub, out_dir)


def _upload(sub, stack_dir: Path, slug: str) -> None:
    """The checked submission to Kaggle, from a temporary folder inside the stack folder (removed after)."""
    from ..kaggle_upload import connect, lineage_message, upload
    from ..stack.folder import StackDir

    api = connect()  # client and credentials first: a failure leaves everything as it was
    message = lineage_message(StackDir(stack_dir).require_choice("run the stack stage"))
    with tempfile.TemporaryDirectory(dir=stack_dir, prefix=".upload-") as tmp:
        path = Path(tmp) / "submission.csv"
        sub.to_csv(path, index=False)
        answer = upload(api, path, slug, message)
    print(f"submit: uploaded to kaggle.com/competitions/{slug} ({answer}); message: {message}")


def _checked(scores_csv: Path, test_h5: Path, allow_degenerate: bool):
    import pandas as pd

    from ..data.h5_reader import list_ids
    from ..errors import Missing

    if not Path(scores_csv).exists():
        raise Missing(f"{scores_csv}: missing; run the stack stage first")
    scores = pd.read_csv(scores_csv)
    sub = pd.DataFrame({"ID": scores["id"].astype("int64"), "Pred": scores["pred"].astype("int64")})
    check_submission(sub, list_ids(test_h5), source=str(scores_csv))
    if sub["Pred"].nunique() == 1 and len(sub) > 1 and not allow_degenerate:
        raise SubmissionError(
            f"{scores_csv}: every one of the {len(sub)} test patches is predicted {int(sub['Pred'].iloc[0])}: "
            "a degenerate submission (check the runs); pass --allow-degenerate to write it anyway"
        )
    return sub


def _place(sub, out_dir: Path) -> Path:
    import pandas as pd

    from ..safeio import DiskError, atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "submission.csv"
    if path.exists() and pd.read_csv(path).equals(sub):
        print(f"submit: {path} already holds these predictions, nothing to do")
        return path
    if path.is_symlink():
        raise SubmissionError(f"{path}: is a symbolic link; the submission is never written through one "
                              "(remove or rename it)")
    try:
        with atomic(path) as tmp:
            sub.to_csv(tmp, index=False)  # complete before the old submission moves
            if path.exists():
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
                keep = out_dir / f"submission.{stamp}.csv"
                n = 1
                while keep.exists() or keep.is_symlink():
                    keep, n = out_dir / f"submission.{stamp}-{n}.csv", n + 1
                path.rename(keep)
                print(f"submit: kept the previous submission as {keep}")
    except DiskError as e:
        raise SubmissionError(
            f"the new submission: {e}; {'the previous one is untouched' if path.exists() else 'nothing was written'}"
        ) from None
    except OSError as e:
        raise SubmissionError(
            f"{path}: could not write the new submission ({e.strerror or e}); "
            f"{'the previous one is untouched' if path.exists() else 'nothing was written'}"
        ) from None
    print(f"submit: wrote {path}: {len(sub)} rows, {int(sub['Pred'].sum())} predicted tumour "
          f"({sub['Pred'].mean():.1%})")
    return path
