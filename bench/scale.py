"""The frozen-feature path at a chosen size, end to end through the real stages: time, peak memory, accuracy.

    python bench/scale.py --sizes 4000 16000 --dim 1536 --views 8 [--device cpu|cuda] [--work DIR]
                          [--epochs 3] [--keep] [--out FILE]

Per size n: input files in the competition's split mix (train 100,000 : val 34,904 : test 85,054, scaled to n;
train's three centers 0/3/4 in equal shares, val center 1, test center 2, every center balanced) holding one
96 x 96 uint8 gradient image (gzip-compressed in the files; never read by the stages under test, which read
features), then `prepare` and `folds` (not timed), then a feature store written through the store's own writer
(features/store.py: reserved arrays, chunk markers with their checksums, meta.json last) under the key a frozen
config computes, so the stages find it complete and embed nothing. Its features are synthetic - per-center shifted
and scaled Gaussian clusters, a tumour direction a head can learn, each view its own noise - so the printed accuracy
is the pipeline's, not a pathology result. Then, timed, each in its own process: train (every fold) -> infer --adapt
(plain and adapted) -> stack -> submit.

Prints ONE JSON line per size:
  {"n": 16000, "views": 8, "dim": 1536, "store_bytes": ..., "seconds": {"train": ..., "infer": ..., "stack": ...,
   "submit": ..., "total": ...}, "peak_rss_mb": ..., "peak_gpu_mb": null, "accuracy": ..., "bayes_accuracy": ...}
accuracy is the submission's on the test rows; bayes_accuracy the generator's bound (no classifier does better but
by chance: a measured accuracy above it by more than sampling noise is a leak, and the smoke test fails on it).
peak_rss_mb is the largest peak resident memory of the four stage processes (each one's own high-water mark, read
from /proc while it runs; not this generator's); peak_gpu_mb the largest GPU memory nvidia-smi saw them use (null on
CPU). Each size works in its own folder under --work (default: a temporary one), removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

COMPETITION = {"train": 100_000, "val": 34_904, "test": 85_054}
CENTERS = {"train": (0, 3, 4), "val": (1,), "test": (2,)}
SIDE = 96  # prepare caches the images (the competition's side); the feature path never reads them


def split_sizes(n: int) -> dict[str, int]:
    total = sum(COMPETITION.values())
    sizes = {s: max(len(CENTERS[s]) * 2, round(n * c / total)) for s, c in COMPETITION.items()}
    sizes["train"] += n - sum(sizes.values())
    return sizes


def write_inputs(inp: Path, n: int, seed: int) -> dict[str, pd.DataFrame]:
    """train/val/test.h5 in the competition layout (ids 0..n-1) and each split's table (id, center, label)."""
    tables, next_id = {}, 0
    ramp = np.add.outer(np.arange(SIDE), np.arange(SIDE))  # a gradient: not flat, so never filtered as aberrant
    img = np.stack([64 + ramp * 128 // (2 * SIDE) + 8 * c for c in range(3)]).astype(np.uint8)
    inp.mkdir(parents=True, exist_ok=True)
    for split, count in split_sizes(n).items():
        centers = np.repeat(CENTERS[split], -(-count // len(CENTERS[split])))[:count]
        labels = np.arange(count) % 2
        ids = np.arange(next_id, next_id + count)
        next_id += count
        with h5py.File(inp / f"{split}.h5", "w") as f:
            for i, c, y in zip(ids, centers, labels):
                g = f.create_group(str(i))
                g.create_dataset("img", data=img, compression="gzip", compression_opts=1)
                g["label"], g["metadata"] = np.int64(y), np.array([c, 0], np.int64)
        tables[split] = pd.DataFrame({"id": ids.astype(str), "center": centers, "label": labels})
    return tables


class Features:
    """Synthetic frozen features: every center its own offset and scale (the stain shift a per-center
    standardisation removes), a tumour direction (the class means `2 * margin` apart along it, per-patch noise of
    unit variance: the best accuracy is about Phi(margin), 0.93 at 1.5, whatever the width: `bayes`), and per-view
    noise."""

    def __init__(self, dim: int, views: int, seed: int, margin: float = 1.5):
        rng = np.random.default_rng(seed)
        self.dim, self.views, self.seed, self.margin = dim, views, seed, margin
        direction = rng.standard_normal(dim)
        self.direction = (direction / np.linalg.norm(direction) * margin).astype(np.float32)
        self.offset = {c: rng.standard_normal(dim).astype(np.float32) * 2 for c in range(5)}
        self.scale = {c: np.float32(0.6 + 0.2 * c) for c in range(5)}

    def bayes(self) -> float:
        """The best accuracy any classifier can reach on these rows: the class means 2 * margin apart along the
        tumour direction, the noise along it N(0, 1) per patch plus N(0, 0.3^2 / V) from the mean of V views (a
        center's offset and scale are invertible: they change nothing)."""
        from statistics import NormalDist

        return NormalDist().cdf(self.margin / np.sqrt(1 + 0.09 / self.views))

    def rows(self, split: str, centers: np.ndarray, labels: np.ndarray, start: int) -> np.ndarray:
        """Rows start.. of a split, drawn independently of every other split's (each split its own stream: before,
        test row i was train row i up to the center's shift, and the accuracy measured memorisation)."""
        rng = np.random.default_rng([self.seed, ("train", "val", "test").index(split), start])
        base = rng.standard_normal((len(centers), self.dim), np.float32) + (2 * labels[:, None] - 1) * self.direction
        views = base[:, None] + 0.3 * rng.standard_normal((len(centers), self.views, self.dim), np.float32)
        scale = np.array([self.scale[c] for c in centers], np.float32)[:, None, None]
        offset = np.stack([self.offset[c] for c in centers])[:, None]
        return (views * scale + offset).astype(np.float16)


def config_yaml(views: int, epochs: int) -> str:
    """The winning shape (a head on frozen features, per-center standardisation, DANN) on a backbone whose store
    this script writes (resnet18's name and no weights: only the store key depends on it)."""
    return f"""name: scale-head
model: {{backbone: resnet18, weights: none, kind: feature, feature_views: {views}, head_hidden: 512,
        feature_shift: standardize}}
algorithm: {{name: dann, domain_weight: 0.1}}
optim: {{lr: 1.0e-3, domain_lr: 1.0e-3, weight_decay: 1.0e-4}}
train: {{epochs: {epochs}, batch_size: 256, target_batch_size: 128}}
"""


def write_store(root: Path, config: Path, tables: dict, features: Features) -> int:
    """The store the config's key names, through the store's writer; returns its bytes."""
    from histoshift.config import load_config
    from histoshift.data.cache import Cache
    from histoshift.features import store as layout
    from histoshift.paths import Paths
    from histoshift.precision import config_precision

    cfg = load_config(config)
    cache = Cache.open(root / "work" / "cache")
    precision = config_precision(cfg)
    spec = layout.feature_spec(cfg, cache, precision)
    path = Paths(root).features / layout.store_key(spec)
    layout.begin_store(path, spec)
    for split in ("train", "val", "test"):
        table = cache.index[cache.index["split"] == split].sort_values("row")
        truth = tables[split].set_index("id").loc[table["id"].astype(str)]
        shape = (len(table), features.views, features.dim)
        layout.reserve_split(path, split, shape)
        arr = layout.open_split(path, split, shape)
        for start in range(0, len(table), layout.CHUNK_ROWS):
            part = truth.iloc[start:start + layout.CHUNK_ROWS]
            layout.write_chunk(path, split, arr, start, features.rows(split, part["center"].to_numpy(),
                                                                      part["label"].to_numpy(), start))
        del arr
    layout.finish_store(path, {"spec": spec, "dim": features.dim, "synthetic": "bench/scale.py"})
    return sum(f.stat().st_size for f in path.glob("features_*.npy"))


class Peak(threading.Thread):
    """A stage process's peak memory, polled every 0.1 s: resident (VmHWM of /proc/<pid>/status: the high-water mark
    of its own address space - os.wait4's ru_maxrss would also count this generator's memory at the fork) and, with
    `gpu`, the GPU memory nvidia-smi reports for it."""

    def __init__(self, pid: int, gpu: bool):
        super().__init__(daemon=True)
        self.pid, self.gpu, self.rss_kb, self.gpu_mb, self.done = pid, gpu, 0, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                self.rss_kb = max(self.rss_kb, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass  # exited (or a zombie without an address space)
            if self.gpu:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                ).stdout
                for line in out.splitlines():
                    pid, _, mb = line.partition(",")
                    if pid.strip() == str(self.pid):
                        self.gpu_mb = max(self.gpu_mb, int(mb))
            self.done.wait(0.1)


def stage(root: Path, args: list[str], env: dict, log, gpu: bool) -> tuple[float, float, int | None]:
    """One stage in its own process: (seconds, peak RSS in MB, peak GPU MB or None)."""
    t0 = time.time()
    child = subprocess.Popen([sys.executable, "-m", "histoshift", "--root", str(root), *args], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    peak = Peak(child.pid, gpu)
    peak.start()
    while child.poll() is None:  # the last reads before it exits: its high-water mark is kept while it runs
        time.sleep(0.05)
    seconds = time.time() - t0
    peak.done.set()
    peak.join()
    if child.returncode:
        raise SystemExit(f"scale: `histoshift {' '.join(args)}` failed (exit {child.returncode}); see {log.name}")
    return seconds, peak.rss_kb / 1024, peak.gpu_mb if gpu else None


def run_size(n: int, dim: int, views: int, epochs: int, device: str, work: Path, seed: int) -> dict:
    root = work / f"n{n}-d{dim}-v{views}"
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    tables = write_inputs(root / "input", n, seed)
    config = root / "scale.yaml"
    config.write_text(config_yaml(views, epochs))
    with open(root / "stages.log", "w") as log:
        for args in (["prepare"], ["folds"]):
            stage(root, args, env, log, False)
        features = Features(dim, views, seed)
        store_bytes = write_store(root, config, tables, features)
        seconds, rss, gpu = {}, [], []
        for name, args in (("train", ["train", "--config", str(config)]), ("infer", ["infer", "--adapt"]),
                           ("stack", ["stack"]), ("submit", ["submit"])):
            s, r, g = stage(root, args, env, log, device == "cuda")
            seconds[name], rss, gpu = round(s, 1), rss + [r], gpu + [g]
    seconds["total"] = round(sum(seconds.values()), 1)
    submission = pd.read_csv(root / "submissions" / "submission.csv", dtype={"ID": str})
    truth = tables["test"].set_index("id")["label"]
    accuracy = float((submission["Pred"].to_numpy() == truth.loc[submission["ID"]].to_numpy()).mean())
    return {"n": n, "views": views, "dim": dim, "store_bytes": store_bytes, "seconds": seconds,
            "peak_rss_mb": round(max(rss)), "peak_gpu_mb": max(gpu) if device == "cuda" else None,
            "accuracy": round(accuracy, 4), "bayes_accuracy": round(features.bayes(), 4), "test_patches": len(truth),
            "peak_rss_mb_by_stage": dict(zip(("train", "infer", "stack", "submit"),
                                                                            map(round, rss)))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="the head's epochs (the shipped configs: 20)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--work", type=Path, default=None, help="where each size's folder goes (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep each size's folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="histoshift-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in a.sizes:
        result = run_size(n, a.dim, a.views, a.epochs, a.device, work, a.seed)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
        if not a.keep:
            shutil.rmtree(work / f"n{n}-d{a.dim}-v{a.views}", ignore_errors=True)
    for small, large in zip(results, results[1:]):  # the scaling of point 2, on stderr (the JSON lines stay clean)
        grow = (
            (large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / max(large["store_bytes"] - small["store_bytes"], 1)
        )
        per = (large["seconds"]["total"] / large["n"]) / (small["seconds"]["total"] / small["n"])
        print(f"scale: {small['n']} -> {large['n']}: peak RSS grew {grow:.2f} of the store's growth; "
              f"seconds per patch x{per:.2f}", file=sys.stderr)
    if a.work is None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
