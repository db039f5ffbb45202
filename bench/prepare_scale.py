"""`prepare` at competition scale: wall time, throughput and peak memory of the whole process tree.

    python bench/prepare_scale.py --dir /big/disk/folder [--workers 1,0] [--keep]

Writes a competition-size file set (train 100,000 / val 34,904 / test 85,054 patches, float32
3 x 96 x 96, about 24 GB; 512 rendered demo patches, each id its own brightness jitter, so reading
and validation do the real work) unless it is already there, then runs `python -m histoshift
prepare` from scratch once per worker count (0 = the default: one reader per core, at most 8) and
samples the summed resident memory of the process and its reader processes every 0.2 s. The
file set needs about 24 GB and the cache 6.1 GB more; both are removed at the end unless --keep.
The HDF5 files are larger than this machine's page cache, so every run reads them from disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histoshift.data.demo import render_patch  # noqa: E402

SIZES = {"train": (100_000, (0, 3, 4)), "val": (34_904, (1,)), "test": (85_054, (2,))}


def make_files(inp: Path, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    base = np.stack([render_patch(rng, k % 2, 0) for k in range(512)])
    inp.mkdir(parents=True, exist_ok=True)
    next_id, t0 = 0, time.time()
    for split, (count, centers) in SIZES.items():
        tmp = inp / f"{split}.h5.tmp"
        with h5py.File(tmp, "w") as f:
            for k in range(count):
                img = np.clip(base[k % 512] * np.float32(1 + 0.02 * rng.standard_normal()), 0, 1).astype(np.float32)
                g = f.create_group(str(next_id))
                g["img"], g["label"] = img, np.int64(k % 2)
                g["metadata"] = np.array([centers[k % len(centers)], k], dtype=np.int64)
                next_id += 1
        tmp.rename(inp / f"{split}.h5")
        print(f"wrote {split}.h5: {count} patches ({time.time() - t0:.0f} s)", flush=True)
    return time.time() - t0


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(resident, anonymous) bytes summed over the process and its children. Resident memory counts the
    pages of the memory-mapped cache arrays being written, which the kernel can drop at any time;
    anonymous memory (RssAnon) is what the process really holds."""
    rss = anon = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            rss += p.memory_info().rss
            with open(f"/proc/{p.pid}/status") as f:
                anon += next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
            pass
    return rss, anon


def run_prepare(root: Path, workers: int) -> dict:
    shutil.rmtree(root / "work", ignore_errors=True)  # a fresh build each time (and room for it)
    cmd = [sys.executable, "-m", "histoshift", "--root", str(root), "prepare", "--force", "--workers", str(workers)]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, peak_anon = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss, anon = tree_memory(ps)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.2)
    wall = time.time() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{out}")
    n = sum(c for c, _ in SIZES.values())
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "images_per_s": round(n / wall),
        "peak_rss_gb": round(peak / 1e9, 2),
        "peak_anon_gb": round(peak_anon / 1e9, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a folder with ~31 GB free")
    ap.add_argument("--workers", default="1,0", help="comma-separated worker counts (0 = the default)")
    ap.add_argument("--keep", action="store_true", help="keep the files and the cache")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    root = Path(a.dir)
    inp = root / "input"
    gen = None
    if not all((inp / f"{s}.h5").exists() for s in SIZES):
        gen = round(make_files(inp), 1)
    size = sum((inp / f"{s}.h5").stat().st_size for s in SIZES)
    rows = []
    for w in (int(x) for x in a.workers.split(",")):
        row = run_prepare(root, w)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cache = sum(p.stat().st_size for p in (root / "work" / "cache").iterdir())
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}: {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM", "input_gb": round(size / 1e9, 1),
              "cache_gb": round(cache / 1e9, 2), "generate_s": gen, "runs": rows}
    out = Path(a.out) / f"prepare-scale-{result['date']}-{os.cpu_count()}cores.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| readers | wall | images/s | peak resident (process tree) | of which anonymous |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers'] or 'default'} | {r['wall_s']:.0f} s | {r['images_per_s']} | {r['peak_rss_gb']} GB | "
              f"{r.get('peak_anon_gb')} GB |")
    print(f"wrote {out}")
    if not a.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
