"""The prepared cache (the `prepare` stage writes it: stages/prepare.py, data/build.py): validated once, read by
every stage after.

The cache holds, per split, an N x S x S x 3 uint8 array (`images_<split>.npy`, memory-mappable)
and one index table for all splits (`index.csv`: id, split, row, center, label, n_black, n_white,
grey_std, aberrant, reason), and a data overview (`overview.png`, `colours.png`, `colour_stats.csv`:
data/overview.py). Its manifest records the inputs' size and modification time (a second
run with unchanged inputs does nothing), the centers contract, and per split a digest of what was
cached (images, ids, labels, centers); the cache id hashes them, and every later stage records it.

A new cache is built in a hidden folder beside the old one and swapped in only when complete: a
failed or interrupted prepare leaves the previous cache as it was. Free space is checked, and the
image arrays reserved on disk, before anything is converted.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import Missing
from ..lineage import StaleError
from ..verified import VERIFIED, Record
from .h5_reader import InputError

SPLITS = ("train", "val", "test")
LABELLED = {"train": True, "val": True, "test": False}
CACHE_VERSION = 2


@dataclass(frozen=True)
class Contract:
    """Which centers each file may hold (Camelyon17-WILDS: train 0, 3, 4; val 1; test 2). Empty: any."""
    train: tuple[int, ...] = (0, 3, 4)
    val: tuple[int, ...] = (1,)
    test: tuple[int, ...] = (2,)

    @classmethod
    def parse(cls, text: str) -> "Contract":
        """'train=0,3,4;val=1;test=2' (a split left out keeps its default) or 'any' (no check)."""
        if text.strip() == "any":
            return cls((), (), ())
        values = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            split, _, centers = part.partition("=")
            if split.strip() not in SPLITS or not centers:
                raise InputError(f"--centers: expected 'train=0,3,4;val=1;test=2' or 'any', got {text!r}")
            try:
                values[split.strip()] = tuple(sorted(int(c) for c in centers.split(",")))
            except ValueError:
                raise InputError(f"--centers: {part!r} holds a center that is not an integer") from None
        contract = cls(**values)
        shared = [
            (a, b) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :] if set(contract.of(a)) & set(contract.of(b))
        ]
        if shared:
            raise InputError(
                f"--centers: {shared[0][0]} and {shared[0][1]} share a center; the splits must be disjoint"
            )
        return contract

    def of(self, split: str) -> tuple[int, ...]:
        return getattr(self, split)

    def __str__(self) -> str:
        if not any(self.of(s) for s in SPLITS):
            return "any centers"
        return "; ".join(f"{s} {','.join(map(str, self.of(s))) or 'any'}" for s in SPLITS)


def input_files(input_dir: Path) -> dict:
    """Per split the input file's quick identity: size and modification time, and its change time (ctime), which
    the system sets on every write and no tool sets back: an edit that restores the modification time still
    moves it (so does a copy or a chmod: then the bytes are compared, `changed_inputs`)."""
    files = {}
    for split in SPLITS:
        p = input_dir / f"{split}.h5"
        if not p.exists():
            raise InputError(f"{p}: file not found")
        files[split] = _file_entry(p)
    return files


def _file_entry(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, ctime) -> content digest, within a process


def _blake2b(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def file_digest(path: Path, record: Record | None = None) -> str:
    """A digest of a file's bytes (blake2b; Python's file_digest reads in large blocks at about 1 GB/s a core),
    memoised per (path, size, mtime, ctime) within a process and, with the root's `record` (verified.py), across
    processes and stages: a file is read again only when a stat says it may have changed since it was read."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _blake2b(path) if record is None else record.digest(path, _blake2b, "blake2b")
    return _DIGESTS[key]


def file_digests(input_dir: Path, record: Record | None = None) -> dict:
    """The content digest of each input file. Stored in the manifest by prepare; compared whenever a file's
    change time moved (`changed_inputs`) and, with `prepare --verify`, whenever a stat cannot show it unchanged
    since it was last read."""
    return {split: file_digest(Path(input_dir) / f"{split}.h5", record) for split in SPLITS}


def record_of(cache_dir: Path) -> Record:
    """The verification record of the root a cache belongs to (work/verified.json)."""
    return Record(Path(cache_dir).parent / VERIFIED)


def changed_inputs(input_dir: Path, manifest: dict, verify: bool = False,
                   record: Record | None = None) -> dict[str, str]:
    """The input files that are not the ones the cache was built from -> how they changed. Size or modification
    time differ: changed. Change time moved (or `verify`): the bytes are compared with the manifest's digest, so
    an edit in place that kept size and modification time is caught - read only when the `record` cannot show
    them unchanged since they were last read (a `cp -a` of the root costs one read per file, then stats).
    Missing files are not checked (inputs moved away after prepare)."""
    input_dir, out = Path(input_dir), {}
    for split in SPLITS:
        path = input_dir / f"{split}.h5"
        if not path.exists():
            continue
        now, then = _file_entry(path), manifest.get("files", {}).get(split, {})
        if any(now[k] != then.get(k) for k in ("size", "mtime_ns")):
            out[split] = f"{path} changed since the cache was built (size or modification time)"
        elif (verify or now["ctime_ns"] != then.get("ctime_ns")) and \
                file_digest(path, record) != manifest.get("content", {}).get(split):
            out[split] = f"{path} changed since the cache was built (in place: same size and modification time, " \
                         "other bytes)"
    return out


def quality_report(index: pd.DataFrame) -> pd.DataFrame:
    g = index.groupby(["split", "center"])
    out = g.agg(patches=("id", "size"), aberrant=("aberrant", "sum"),
                black=("reason", lambda r: int((r == "black").sum())),
                white=("reason", lambda r: int((r == "white").sum())),
                flat=("reason", lambda r: int((r == "flat").sum()))).reset_index()
    out["aberrant_pct"] = (100 * out["aberrant"] / out["patches"]).round(2)
    return out


def load_index(cache_dir: Path) -> pd.DataFrame:
    path = Path(cache_dir) / "index.csv"
    if not (Path(cache_dir) / "manifest.json").exists() or not path.exists():
        raise Missing(f"{cache_dir}: no complete cache; run the prepare stage first")
    df = pd.read_csv(path, keep_default_na=False)
    df["reason"] = df["reason"].astype(str)
    return df


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        raise Missing(f"{cache_dir}: no complete cache; run the prepare stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise StaleError(f"{cache_dir}: built by an older version of this code; run prepare --force")
    return manifest


def check_inputs(input_dir: Path, cache_dir: Path) -> dict:
    """The cache's manifest, after checking that input/*.h5 are the files it was built from (`changed_inputs`;
    a folder without the files, e.g. inputs moved away after prepare, is not checked)."""
    manifest = read_manifest(cache_dir)
    changed = changed_inputs(input_dir, manifest, record=record_of(cache_dir))
    if changed:
        raise StaleError(f"{'; '.join(changed.values())}; run prepare (then the stages after it recompute or refuse "
                         "what is stale)")
    return manifest


@dataclass
class Cache:
    """The prepared cache: index table plus one memory-mapped image array per split."""

    dir: Path
    index: pd.DataFrame
    manifest: dict = field(default_factory=dict)

    @classmethod
    def open(cls, cache_dir: Path) -> "Cache":
        return cls(Path(cache_dir), load_index(cache_dir), read_manifest(cache_dir))

    @property
    def id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def digests(self) -> dict[str, str]:
        """Per split: the digest of its cached images, ids, labels and centers."""
        return {s: v["digest"] for s, v in self.manifest["splits"].items()}

    def images(self, split: str, in_memory: bool = True) -> np.ndarray:
        arr = np.load(self.dir / f"images_{split}.npy", mmap_mode="r")
        return np.ascontiguousarray(arr) if in_memory else arr

    def gather(self, table: pd.DataFrame) -> np.ndarray:
        """Images for the rows of `table` (any mix of splits), in the table's order."""
        return gather_by_split({s: self.images(s, in_memory=False) for s in SPLITS}, table)


def gather_by_split(arrays: dict[str, np.ndarray], table: pd.DataFrame) -> np.ndarray:
    """Rows of per-split arrays (indexed by the table's split and row columns), in the table's order."""
    table = table.reset_index(drop=True)
    first = next(iter(arrays.values()))
    out = np.empty((len(table),) + first.shape[1:], dtype=first.dtype)
    for split, part in table.groupby("split", sort=False):
        out[part.index.to_numpy()] = arrays[split][part["row"].to_numpy()]
    return out
