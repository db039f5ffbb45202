"""Stage `prepare`: validate the competition files once and convert them into a cache.

The cache holds, per split, an N x S x S x 3 uint8 array (`images_<split>.npy`, memory-mappable)
and one index table for all splits (`index.csv`: id, split, row, center, label, n_black, n_white,
grey_std, aberrant, reason), and a data overview (`overview.png`, `colours.png`, `colour_stats.csv`:
data/overview.py). Its manifest records the inputs' size and modification time (a second
run with unchanged inputs does nothing), the centers contract, and per split a digest of what was
cached (images, ids, labels, centers); the cache id hashes them, and every later stage records it.

HDF5 groups are read and validated by several processes (`workers`), a chunk of ids each, in order.
A new cache is built in a hidden folder beside the old one and swapped in only when complete: a
failed or interrupted prepare leaves the previous cache as it was. Free space is checked, and the
image arrays reserved on disk, before anything is converted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from ..lineage import StaleError
from ..progress import bar as progress_bar
from ..safeio import Lock, require_free, reserve_npy, write_csv, write_json
from .h5_reader import InputError, open_h5, read_chunk, read_record, sorted_keys
from .overview import write_overview
from .quality import QualityRule, measure

SPLITS = ("train", "val", "test")
LABELLED = {"train": True, "val": True, "test": False}
CACHE_VERSION = 2
CHUNK = 1024  # images per read job, write and quality pass (bounds the float temporaries to ~110 MB)


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
        shared = [(a, b) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:] if set(contract.of(a)) & set(contract.of(b))]
        if shared:
            raise InputError(f"--centers: {shared[0][0]} and {shared[0][1]} share a center; the splits must be disjoint")
        return contract

    def of(self, split: str) -> tuple[int, ...]:
        return getattr(self, split)

    def __str__(self) -> str:
        if not any(self.of(s) for s in SPLITS):
            return "any centers"
        return "; ".join(f"{s} {','.join(map(str, self.of(s))) or 'any'}" for s in SPLITS)


def _input_files(input_dir: Path) -> dict:
    files = {}
    for split in SPLITS:
        p = input_dir / f"{split}.h5"
        if not p.exists():
            raise InputError(f"{p}: file not found")
        st = p.stat()
        files[split] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return files


def file_digests(input_dir: Path) -> dict:
    """A digest of each input file's bytes (blake2b; Python's file_digest reads in large blocks at about
    1 GB/s a core). Stored in the manifest by prepare; `prepare --verify` recomputes it, so a file edited
    with its size and modification time kept is caught (the quick check of every stage sees only those)."""
    out = {}
    for split in SPLITS:
        with open(input_dir / f"{split}.h5", "rb") as f:
            out[split] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return out


def _fingerprint(input_dir: Path, rule: QualityRule, contract: Contract) -> dict:
    """What decides whether the cache must be rebuilt (the manifest holds this and the digests)."""
    fp = {"version": CACHE_VERSION, "files": _input_files(input_dir), "rule": asdict(rule), "contract": asdict(contract)}
    return json.loads(json.dumps(fp))  # as the manifest will hold it (tuples become lists)


def _chunk_job(path: Path, keys: list[str], labelled: bool, rule: QualityRule):
    chunk = read_chunk(path, keys, labelled)
    return chunk, measure(chunk.images, rule)


def _chunks(path: Path, keys: list[str], labelled: bool, rule: QualityRule, workers: int):
    """(Chunk, quality) in id order; read by `workers` processes (a bounded window of jobs ahead)."""
    jobs = [keys[i:i + CHUNK] for i in range(0, len(keys), CHUNK)]
    if workers <= 1:
        for job in jobs:
            yield _chunk_job(path, job, labelled, rule)
        return
    # spawned, not forked: the parent may hold threads (torch, tqdm) and HDF5 state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending = [pool.submit(_chunk_job, path, job, labelled, rule) for job in jobs[:2 * workers]]
        for k in range(len(jobs)):
            result = pending.pop(0).result()
            if k + 2 * workers < len(jobs):
                pending.append(pool.submit(_chunk_job, path, jobs[k + 2 * workers], labelled, rule))
            yield result


def _convert_split(path: Path, keys: list[str], split: str, out: Path, rule: QualityRule, contract: Contract,
                   side: int, workers: int) -> tuple[pd.DataFrame, str]:
    images = reserve_npy(out, (len(keys), side, side, 3), np.uint8, f"the {split} images (the previous cache is untouched)")
    allowed = set(contract.of(split))
    digest = hashlib.blake2b(digest_size=16)
    frames, row = [], 0
    bar = progress_bar(total=len(keys), desc=f"prepare {split}", unit="img")
    for chunk, q in _chunks(path, keys, LABELLED[split], rule, workers):
        if chunk.images.shape[1] != side:
            raise InputError(f"{path}, id {chunk.ids[0]}: img side {chunk.images.shape[1]} differs from the {side} seen before")
        inside = np.isin(chunk.centers, list(allowed)) if allowed else None
        if inside is not None and not inside.all():
            k = int(np.argmin(inside))
            raise InputError(f"{path}, id {chunk.ids[k]}: center {chunk.centers[k]} is not a {split} center of the "
                             f"contract ({contract}); files that follow another split: prepare --centers "
                             "'train=..;val=..;test=..' (or 'any')")
        images[row:row + len(chunk.ids)] = chunk.images
        for part in (chunk.ids, chunk.labels, chunk.centers, chunk.images):
            digest.update(np.ascontiguousarray(part).tobytes())
        frames.append(pd.DataFrame({"id": chunk.ids, "split": split, "row": np.arange(row, row + len(chunk.ids)),
                                    "center": chunk.centers, "label": chunk.labels, **q}))
        row += len(chunk.ids)
        bar.update(len(chunk.ids))
    bar.close()
    images.flush()
    del images
    return pd.concat(frames, ignore_index=True), digest.hexdigest()


def _first_side(path: Path, first_key: str) -> int:
    with open_h5(path) as f:
        return read_record(path, f, first_key, labelled=False).img.shape[0]


def default_workers(n_images: int) -> int:
    return 1 if n_images < 8 * CHUNK else max(1, min(os.cpu_count() or 1, 8))


def prepare(input_dir: Path, cache_dir: Path, rule: QualityRule = QualityRule(), force: bool = False,
            contract: Contract = Contract(), workers: int = 0, verify: bool = False) -> pd.DataFrame:
    """Build the cache (or reuse it when the inputs are unchanged) and return the index table.
    `workers`: reader processes (0: one per core, at most 8, for files of more than 8 chunks). Unchanged
    means same size and modification time, and with `verify` also the same bytes (`file_digests`)."""
    input_dir, cache_dir = Path(input_dir), Path(cache_dir)
    with Lock(cache_dir.with_name(f".{cache_dir.name}.lock"), f"the cache {cache_dir} (prepare)"):
        fp = _fingerprint(input_dir, rule, contract)
        manifest = cache_dir / "manifest.json"
        digests = file_digests(input_dir) if verify else None
        if not force and manifest.exists():
            old = json.loads(manifest.read_text())
            if {k: old.get(k) for k in fp} == fp:
                changed = [s for s in SPLITS if digests and old.get("content", {}).get(s) != digests[s]]
                if not changed:
                    print(f"prepare: cache in {cache_dir} is up to date{' (file contents verified)' if verify else ''}, "
                          "nothing to do")
                    return load_index(cache_dir)
                print(f"prepare: {', '.join(str(input_dir / f'{s}.h5') for s in changed)} changed with size and "
                      "modification time kept (or the cache predates content digests); rebuilding the cache")
        for stale in [*cache_dir.parent.glob(f".{cache_dir.name}.building-*"), *cache_dir.glob(".building-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed prepare
        paths = {split: input_dir / f"{split}.h5" for split in SPLITS}
        keys = {split: sorted_keys(p) for split, p in paths.items()}  # listed and validated once
        counts = {split: len(k) for split, k in keys.items()}
        side = _first_side(paths["train"], keys["train"][0])
        require_free(cache_dir.parent, sum(counts.values()) * side * side * 3 + 200 * sum(counts.values()),
                     f"a new cache of {sum(counts.values())} patches"
                     + (f" (built beside the old one: deleting {cache_dir} first frees its space)" if cache_dir.exists() else ""))
        workers = workers or default_workers(max(counts.values()))
        # a mount point cannot be renamed (EBUSY): the new cache is then built inside it and swapped file by file
        mounted = cache_dir.is_dir() and os.path.ismount(cache_dir)
        new = (cache_dir / f".building-{os.getpid()}" if mounted
               else cache_dir.with_name(f".{cache_dir.name}.building-{os.getpid()}"))
        new.mkdir(parents=True)
        try:
            index = _build(paths, keys, new, rule, contract, side, workers, fp, digests or file_digests(input_dir))
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        if mounted:
            _swap_contents(cache_dir, new)
        elif cache_dir.exists():  # swap: the old cache goes only once the new one is complete
            old = cache_dir.with_name(f".{cache_dir.name}.old-{os.getpid()}")
            cache_dir.rename(old)
            new.rename(cache_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            new.rename(cache_dir)
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


def _build(paths: dict, keys: dict, out: Path, rule: QualityRule, contract: Contract, side: int, workers: int,
           fp: dict, content: dict) -> pd.DataFrame:
    frames, digests, seen = [], {}, {}
    for split, path in paths.items():
        df, digests[split] = _convert_split(path, keys[split], split, out / f"images_{split}.npy", rule, contract,
                                            side, workers)
        for i in df["id"]:
            if i in seen:
                raise InputError(f"{path}, id {i}: duplicate id, already present in {seen[i]}")
            seen[i] = path
        frames.append(df)
    index = pd.concat(frames, ignore_index=True)
    write_csv(out / "index.csv", index)
    write_csv(out / "quality_report.csv", quality_report(index))
    write_overview(out, index)  # overview.png, colours.png, colour_stats.csv
    splits = {s: {"patches": int((index["split"] == s).sum()), "digest": digests[s]} for s in SPLITS}
    cache_id = hashlib.blake2b(json.dumps([splits, fp["rule"]], sort_keys=True).encode(), digest_size=8).hexdigest()
    write_json(out / "manifest.json", {**fp, "content": content, "splits": splits, "cache_id": cache_id})
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


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{cache_dir}: no complete cache; run the prepare stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise StaleError(f"{cache_dir}: built by an older version of this code; run prepare --force")
    return manifest


def check_inputs(input_dir: Path, cache_dir: Path) -> dict:
    """The cache's manifest, after checking that input/*.h5 are the files it was built from (size and
    mtime; a folder without the files, e.g. inputs moved away after prepare, is not checked)."""
    manifest = read_manifest(cache_dir)
    input_dir = Path(input_dir)
    moved = [s for s in SPLITS if (input_dir / f"{s}.h5").exists()
             and {k: v for k, v in _input_files(input_dir)[s].items() if k != "path"}
             != {k: v for k, v in manifest["files"][s].items() if k != "path"}]
    if moved:
        raise StaleError(f"{', '.join(str(input_dir / f'{s}.h5') for s in moved)} changed since the cache was built; "
                         "run prepare (then the stages after it recompute or refuse what is stale)")
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
