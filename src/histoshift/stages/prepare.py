"""Stage `prepare`: validate the competition files once and convert them into the cache (data/cache.py reads it,
data/build.py converts). A second run with unchanged inputs does nothing; a new cache is built in a hidden folder
beside the old one and swapped in only when complete, so a failed or interrupted prepare leaves the previous cache
as it was. Free space is checked, and the image arrays reserved on disk, before anything is converted."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import HistoshiftError
from . import Stage, timed

STAGE = Stage("validate the HDF5 files and build the uint8 cache with aberrant-patch flags",
              "input/train.h5, input/val.h5, input/test.h5",
              "work/cache/: images_{train,val,test}.npy, index.csv, quality_report.csv, manifest.json "
              "(digests), overview.png, colours.png, colour_stats.csv",
              flow="input/*.h5 -> work/cache/")


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    p.add_argument("--verify", action="store_true",
                   help="also compare the files' bytes with the digests taken when the cache was built (a same-size, "
                        "same-time edit is caught; infer.sh runs it before every submission)")
    p.add_argument("--max-black", type=int, default=200, help="aberrant above this many pure-black pixels")
    p.add_argument("--max-white-frac", type=float, default=0.9, help="aberrant above this share of white pixels")
    p.add_argument("--centers", default="train=0,3,4;val=1;test=2",
                   help="the centers each file may hold (a patch elsewhere is refused); 'any' checks nothing")
    p.add_argument("--workers", type=int, default=0, help="HDF5 reader processes (0: one per core, at most 8)")


def run(a, paths) -> None:
    from ..data.cache import Contract
    from ..data.quality import QualityRule

    rule = QualityRule(max_black=a.max_black, max_white_frac=a.max_white_frac)
    timed("prepare", prepare, paths.input, paths.cache, rule, force=a.force, contract=Contract.parse(a.centers),
          workers=a.workers, verify=a.verify)


def prepare(input_dir: Path, cache_dir: Path, rule=None, force: bool = False, contract=None, workers: int = 0,
            verify: bool = False):
    """Build the cache (or reuse it when the inputs are unchanged) and return the index table.
    `workers`: reader processes (0: one per core, at most 8, for files of more than 8 chunks). Unchanged
    means same size and modification time, and with `verify` also the same bytes (`file_digests`)."""
    from ..data.build import build, default_workers, first_side, fingerprint
    from ..data.cache import SPLITS, Contract, changed_inputs, file_digests, load_index, quality_report, record_of
    from ..data.h5_reader import sorted_keys
    from ..data.quality import QualityRule
    from ..safeio import Lock, require_free, write_json

    rule, contract = rule or QualityRule(), contract or Contract()
    input_dir, cache_dir = Path(input_dir), Path(cache_dir)
    with Lock(cache_dir.with_name(f".{cache_dir.name}.lock"), f"the cache {cache_dir} (prepare)"):
        fp = fingerprint(input_dir, rule, contract)
        manifest = cache_dir / "manifest.json"
        if not force and manifest.exists():
            old = json.loads(manifest.read_text())
            moved = [f"the {what} changed since the cache was built" for what in ("rule", "contract")
                     if old.get(what) != fp[what]]
            moved += ["the cache was built by an older version"] * (old.get("version") != fp["version"])
            moved = moved or list(changed_inputs(input_dir, old, verify=verify, record=record_of(cache_dir)).values())
            if not moved:
                if old.get("files") != fp["files"]:  # change times or paths moved, the bytes compared equal
                    write_json(manifest, {**old, "files": fp["files"]})
                print(f"prepare: cache in {cache_dir} is up to date{' (file contents verified)' if verify else ''}, "
                      "nothing to do")
                return load_index(cache_dir)
            print(f"prepare: {'; '.join(moved)}: rebuilding the cache")
        for stale in [*cache_dir.parent.glob(f".{cache_dir.name}.building-*"), *cache_dir.glob(".building-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed prepare
        paths = {split: input_dir / f"{split}.h5" for split in SPLITS}
        keys = {split: sorted_keys(p) for split, p in paths.items()}  # listed and validated once
        counts = {split: len(k) for split, k in keys.items()}
        side = first_side(paths["train"], keys["train"][0])
        require_free(
            cache_dir.parent,
            sum(counts.values()) * side * side * 3 + 200 * sum(counts.values()),
            f"a new cache of {sum(counts.values())} patches"
            + (
                f" (built beside the old one: deleting {cache_dir} first frees its space)" if cache_dir.exists() else ""
            ),
        )
        workers = workers or default_workers(max(counts.values()))
        # a mount point cannot be renamed (EBUSY): the new cache is then built inside it and swapped file by file
        mounted = cache_dir.is_dir() and os.path.ismount(cache_dir)
        new = (cache_dir / f".building-{os.getpid()}" if mounted
               else cache_dir.with_name(f".{cache_dir.name}.building-{os.getpid()}"))
        new.mkdir(parents=True)
        try:
            index = build(
                paths, keys, new, rule, contract, side, workers, fp, file_digests(input_dir, record_of(cache_dir))
            )
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        try:
            _place(cache_dir, new, mounted)
        except OSError as e:  # a mount point os.path.ismount does not see (bind mounts), a read-only folder
            shutil.rmtree(new, ignore_errors=True)
            raise CacheError(
                f"{cache_dir}: the new cache cannot take its place ({e.strerror}: a mount point or a "
                "read-only folder?); the previous cache is unchanged and nothing was left behind. Make "
                "it writable, or point --root at a folder whose work/cache is an ordinary folder"
            ) from None
    report = quality_report(index)
    print("aberrant patches per center (left out of training; test patches are always predicted):")
    print(report.to_string(index=False))
    print(f"prepare: data overview in {cache_dir / 'overview.png'}, {cache_dir / 'colours.png'} and colour_stats.csv")
    return index


def _swap_contents(cache_dir: Path, new: Path) -> None:
    """Replace a mounted cache folder's files by those of `new` (built inside it). The manifest marks a
    complete cache, so the old one goes first and the new one comes last: a crash in between leaves a
    cache without a manifest, which every stage refuses and the next prepare rebuilds."""
    (cache_dir / "manifest.json").unlink(missing_ok=True)
    for p in cache_dir.iterdir():
        if p == new or p.name.startswith(".building-"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    for p in sorted(new.iterdir(), key=lambda p: p.name == "manifest.json"):
        p.rename(cache_dir / p.name)
    new.rmdir()


class CacheError(HistoshiftError, OSError):
    """The cache folder cannot be replaced (read-only, a mount point rename cannot move)."""


def _place(cache_dir: Path, new: Path, mounted: bool) -> None:
    """The complete new cache in place of the old one: swapped by renames, or file by file inside a mount point."""
    if mounted:
        _swap_contents(cache_dir, new)
    elif cache_dir.exists():  # swap: the old cache goes only once the new one is complete
        old = cache_dir.with_name(f".{cache_dir.name}.old-{os.getpid()}")
        cache_dir.rename(old)
        try:
            new.rename(cache_dir)
        except OSError:
            old.rename(cache_dir)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(cache_dir)
