"""Stage `prepare`: validate the competition files once and convert them into a cache.

The cache holds, per split, an N x S x S x 3 uint8 array (`images_<split>.npy`, memory-mappable)
and one index table for all splits (`index.csv`: id, split, row, center, label, n_black, n_white,
grey_std, aberrant, reason). A manifest records the inputs' size and modification time, so a
second run with unchanged inputs does nothing. Files are written under temporary names and renamed
only when complete: an interrupted run never leaves a cache that looks valid.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .h5_reader import InputError, iter_records, list_ids
from .quality import QualityRule, measure

SPLITS = ("train", "val", "test")
LABELLED = {"train": True, "val": True, "test": False}
CACHE_VERSION = 1
CHUNK = 1024  # images per write + quality pass (bounds the float temporaries to ~110 MB)


def _fingerprint(input_dir: Path, rule: QualityRule) -> dict:
    files = {}
    for split in SPLITS:
        p = input_dir / f"{split}.h5"
        if not p.exists():
            raise InputError(f"{p}: file not found")
        st = p.stat()
        files[split] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"version": CACHE_VERSION, "files": files, "rule": dataclasses.asdict(rule)}


def _convert_split(path: Path, split: str, out: Path, rule: QualityRule, side_hint: int | None):
    n = len(list_ids(path))
    images = None
    rows: list[dict] = []
    chunk_imgs: list[np.ndarray] = []
    chunk_rows: list[dict] = []

    def flush():
        if not chunk_imgs:
            return
        batch = np.stack(chunk_imgs)
        start = len(rows)
        images[start:start + len(batch)] = batch
        q = measure(batch, rule)
        for k, r in enumerate(chunk_rows):
            r.update({name: q[name][k].item() for name in q})
        rows.extend(chunk_rows)
        chunk_imgs.clear()
        chunk_rows.clear()

    for rec in tqdm(iter_records(path, LABELLED[split]), total=n, desc=f"prepare {split}", unit="img"):
        side = rec.img.shape[0]
        if side_hint is None:
            side_hint = side
        elif side != side_hint:
            raise InputError(f"{path}, id {rec.id}: img side {side} differs from the {side_hint} seen before")
        if images is None:
            images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
        chunk_imgs.append(rec.img)
        chunk_rows.append({"id": rec.id, "split": split, "row": len(rows) + len(chunk_rows),
                           "center": rec.center, "label": rec.label})
        if len(chunk_imgs) == CHUNK:
            flush()
    flush()
    images.flush()
    del images
    return pd.DataFrame(rows), side_hint


def prepare(input_dir: Path, cache_dir: Path, rule: QualityRule = QualityRule(), force: bool = False) -> pd.DataFrame:
    """Build the cache (or reuse it when the inputs are unchanged) and return the index table."""
    input_dir, cache_dir = Path(input_dir), Path(cache_dir)
    fp = _fingerprint(input_dir, rule)
    manifest = cache_dir / "manifest.json"
    if not force and manifest.exists() and json.loads(manifest.read_text()) == fp:
        print(f"prepare: cache in {cache_dir} is up to date, nothing to do")
        return load_index(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # the cache is invalid until the new manifest is written

    frames, side, seen = [], None, {}
    for split in SPLITS:
        path = input_dir / f"{split}.h5"
        tmp = cache_dir / f"images_{split}.tmp.npy"
        df, side = _convert_split(path, split, tmp, rule, side)
        for i in df["id"]:
            if i in seen:
                raise InputError(f"{path}, id {i}: duplicate id, already present in {seen[i]}")
            seen[i] = path
        os.replace(tmp, cache_dir / f"images_{split}.npy")
        frames.append(df)
    index = pd.concat(frames, ignore_index=True)
    index.to_csv(cache_dir / "index.csv", index=False)
    report = quality_report(index)
    report.to_csv(cache_dir / "quality_report.csv", index=False)
    print("aberrant patches per center (left out of training; test patches are always predicted):")
    print(report.to_string(index=False))
    manifest.write_text(json.dumps(fp, indent=2))
    return index


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
        raise FileNotFoundError(f"{cache_dir}: no complete cache; run the prepare stage first")
    df = pd.read_csv(path, keep_default_na=False)
    df["reason"] = df["reason"].astype(str)
    return df


@dataclass
class Cache:
    """The prepared cache: index table plus one memory-mapped image array per split."""

    dir: Path
    index: pd.DataFrame

    @classmethod
    def open(cls, cache_dir: Path) -> "Cache":
        return cls(Path(cache_dir), load_index(cache_dir))

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
