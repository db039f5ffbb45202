"""What verifying the inputs and the feature store costs per stage, at the competition's size, before and after the
verification record (src/histoshift/verified.py).

    python bench/verify.py [--work DIR] [--rows 219958] [--dim 1536] [--views 8] [--inputs-gb 24.3] [--blob-gb 4.5]
                           [--out bench/results/verify-<date>.json]

Writes, under --work (default: a temporary folder, removed after):
- a feature store of `rows` x `views` x `dim` float16 through the store's own writer (features/store.py), train /
  val / test in the competition's proportions (5.4 GB at the defaults: H-optimus-0's width);
- three input files of the competition's sizes in bytes (train.h5 11.1 GB, val.h5 3.9 GB, test.h5 9.4 GB at 96 x 96
  x 3 float32 a patch; any bytes: only their hashing is timed, nothing parses them);
- one hub-blob-sized file (H-optimus-0's model.safetensors, 4.5 GB).
and times, with the functions the stages call:
- store, before: `bad_chunks()` - what every fold of train and infer ran when it opened the store (4 folds: 4x);
- store, after: the first open (`bad_chunks(record)`: the full read, then recorded) and every later one (stats);
- inputs, before: `file_digests` without a record - what `prepare --verify` (every infer.sh) and, in a root copied
  with `cp -a`, every stage read; after: the first check (read once, recorded) and later ones (stats);
- hub blob: the SHA-256 of the blob - the one read a copied hub cache now costs (before: the whole store embedded
  again, about an hour of a GPU).
The store is read from the page cache right after being written (as after an embed); the inputs (24 GB) exceed this
machine's memory, so they are read from disk. Prints a table and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from histoshift.data import cache as inputs  # noqa: E402
from histoshift.features import store as layout  # noqa: E402
from histoshift.verified import Record  # noqa: E402

SHARES = {"train": 100_000, "val": 34_904, "test": 85_054}
PATCH_BYTES = 3 * 96 * 96 * 4  # one float32 img dataset


def fill(path: Path, nbytes: int, seed: int) -> None:
    """A file of `nbytes` bytes that are not zeros (real blocks on disk, not a sparse file)."""
    block = np.random.default_rng(seed).bytes(64 << 20)
    with open(path, "wb") as f:
        for i in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - i)])


def write_store(path: Path, rows: int, views: int, dim: int) -> int:
    layout.begin_store(path, {"bench": "verify.py"})
    total = sum(SHARES.values())
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((layout.CHUNK_ROWS, views, dim)).astype(np.float16)
    for split, share in SHARES.items():
        n = round(rows * share / total)
        layout.reserve_split(path, split, (n, views, dim))
        arr = layout.open_split(path, split, (n, views, dim))
        for start in range(0, n, layout.CHUNK_ROWS):
            part = chunk[: min(layout.CHUNK_ROWS, n - start)].copy()
            part[:, 0, 0] = start // layout.CHUNK_ROWS  # every chunk its own bytes
            layout.write_chunk(path, split, arr, start, part)
        del arr
    layout.finish_store(path, {"spec": {"views": views}, "dim": dim})
    return sum(p.stat().st_size for p in path.glob("features_*.npy"))


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--rows", type=int, default=sum(SHARES.values()))  # 219,958
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--inputs-gb", type=float, default=None, help="default: the competition's, 220k float32 patches")
    p.add_argument("--blob-gb", type=float, default=4.5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"verify-{time.strftime('%F')}.json")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="histoshift-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%F"),
        "rows": a.rows,
        "views": a.views,
        "dim": a.dim,
    }
    try:
        store = work / "work" / "features" / "bench-store"
        result["store_bytes"] = write_store(store, a.rows, a.views, a.dim)
        record = Record(work / "work" / "verified.json")
        fs = layout.FeatureStore(store)
        result["store_full_check_s"] = seconds(fs.bad_chunks)  # before: every fold, every process
        result["store_first_open_s"] = seconds(lambda: fs.bad_chunks(record))
        result["store_later_open_s"] = seconds(lambda: fs.bad_chunks(record))
        shutil.rmtree(store)

        folder = work / "input"
        folder.mkdir()
        scale = (a.inputs_gb * 1e9 / (sum(SHARES.values()) * PATCH_BYTES)) if a.inputs_gb else 1.0
        for i, (split, share) in enumerate(SHARES.items()):
            fill(folder / f"{split}.h5", int(share * PATCH_BYTES * scale), i)
        result["inputs_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        result["inputs_hash_s"] = seconds(lambda: inputs.file_digests(folder))  # before: every prepare --verify
        inputs._DIGESTS.clear()
        record = Record(work / "work" / "verified2.json")
        result["inputs_first_check_s"] = seconds(lambda: inputs.file_digests(folder, record))
        inputs._DIGESTS.clear()  # another process
        result["inputs_later_check_s"] = seconds(lambda: inputs.file_digests(folder, record))
        shutil.rmtree(folder)

        blob = work / "blob"
        fill(blob, int(a.blob_gb * 1e9), 7)

        def sha256():
            with open(blob, "rb") as f:
                hashlib.file_digest(f, "sha256")
        result["blob_bytes"] = blob.stat().st_size
        result["blob_sha256_s"] = seconds(sha256)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    s, gb = result, 1e9
    print(
        f"| what | bytes | before (s per stage) | after: first (s) | after: later (s) |\n|---|---|---|---|---|\n"
        f"| feature store, train or infer of 4 folds | {s['store_bytes'] / gb:.1f} GB | "
        f"{4 * s['store_full_check_s']:.1f} "
        f"(4 x {s['store_full_check_s']:.1f}) | {s['store_first_open_s']:.1f} | {s['store_later_open_s']:.4f} |\n"
        f"| inputs, prepare --verify (or any stage of a cp -a root) | {s['inputs_bytes'] / gb:.1f} GB | "
        f"{s['inputs_hash_s']:.1f} | {s['inputs_first_check_s']:.1f} | {s['inputs_later_check_s']:.4f} |\n"
        f"| hub blob of a copied cache | {s['blob_bytes'] / gb:.1f} GB | the store embedded again | "
        f"{s['blob_sha256_s']:.1f} | 0 (stat) |"
    )
    print(f"machine: {result['machine']}; raw: {a.out}")


if __name__ == "__main__":
    main()
