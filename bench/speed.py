"""Speed benchmark: the data path, and the code that runs (training loop, embedder, TTA) against its ceiling.

    python bench/speed.py [--n 20000] [--out bench/results] [--quick | --smoke]

1. images/s of the naive loader (one HDF5 read per item + flips/rotations in DataLoader workers, as
   public solutions do) at 0, 4 and all-core worker counts, vs this repository's path (uint8 cache
   gathered per batch + augmentation on whole batches on the device), on a generated dataset in
   the competition layout; and the CPU cores each keeps busy.
2-4. bench/loop.py: `engine.fit` (the real loop) on an ImageTask and on a FeatureTask, the embed stage's
   Embedder and the infer stage's TTA predictor, each beside the model-only ceiling measured in the same run
   (same model, same batch), printed as a ratio; the TTA row projects 85,054 test patches x 8 views.
Run it on a GPU and on the CPU (bench/gpu.sh runs it with the other GPU rows); copy the printed table into
docs/benchmarks.md with the machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loop  # noqa: E402
from histoshift.config import AugCfg  # noqa: E402
from histoshift.data.augment import random_views, to_float  # noqa: E402
from histoshift.data.cache import Cache  # noqa: E402
from histoshift.data.demo import render_patch  # noqa: E402
from histoshift.data.loader import TensorBatches, place_images  # noqa: E402
from histoshift.models.preprocess import normalize  # noqa: E402
from histoshift.stages.prepare import prepare  # noqa: E402
from histoshift.stain.transform import InputTransform  # noqa: E402


def augment_batch(images, aug):
    """The torch backend as the image task runs it: dihedral views of the uint8 batch, then the input transform."""
    return InputTransform(aug).train(random_views(images) if aug.dihedral else to_float(images))




def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """n train patches (+ small val/test) in the competition layout; 512 rendered patches, jittered."""
    rng = np.random.default_rng(seed)
    base = np.stack([render_patch(rng, k % 2, 0) for k in range(min(512, max(64, n // 8)))])
    inp = root / "input"
    inp.mkdir(parents=True)
    sizes = {"train": (n, (0, 3, 4)), "val": (min(n, 1000), (1,)), "test": (min(n, 1000), (2,))}
    next_id = 1000
    for split, (count, centers) in sizes.items():
        with h5py.File(inp / f"{split}.h5", "w") as f:
            for k in range(count):
                img = np.clip(base[k % len(base)] + rng.normal(0, 0.01, (1, 1, 1)).astype(np.float32), 0, 1)
                g = f.create_group(str(next_id))
                g["img"], g["label"] = img, np.int64(k % 2)
                g["metadata"] = np.array([centers[k % len(centers)], k], dtype=np.int64)
                next_id += 1
    return inp


class NaiveH5(Dataset):
    """What public notebooks do: read one group per item from the HDF5 file, flip/rotate on the CPU."""

    def __init__(self, path: Path):
        self.path = path
        with h5py.File(path) as f:
            self.keys = list(f.keys())
        self.f = None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self.f is None:
            self.f = h5py.File(self.path, "r")
        g = self.f[self.keys[i]]
        img = torch.from_numpy(g["img"][()])
        k = np.random.randint(8)
        img = torch.rot90(img, k % 4, dims=(1, 2))
        if k >= 4:
            img = torch.flip(img, dims=(2,))
        return img, torch.tensor(float(g["label"][()]))


def cpu_seconds() -> float:
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(fn, n_images: int) -> tuple[float, float]:
    """(images/s, CPU cores busy) of fn(), which processes n_images."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return n_images / wall, (cpu_seconds() - c0) / wall


def bench_loaders(root: Path, device: torch.device, batches: int, batch_size: int = 256,
                  smoke: bool = False) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 1
    for workers in [0] if smoke else sorted({0, 4, cores}):
        loader = DataLoader(NaiveH5(root / "input" / "train.h5"), batch_size=batch_size, shuffle=True,
                            num_workers=workers, persistent_workers=workers > 0, drop_last=True)
        it = iter(loader)
        next(it)  # start the workers

        def run():
            for _ in range(batches):
                x, y = next(it)
                x.to(device)
        ips, busy = measure(run, batches * batch_size)
        rows.append({"loader": f"naive HDF5 per item, {workers} workers", "images_per_s": ips, "cores_busy": busy})
        del it, loader
    t0 = time.perf_counter()
    prepare(root / "input", root / "work" / "cache")
    convert = (time.perf_counter() - t0)
    cache = Cache.open(root / "work" / "cache")
    n_all = len(cache.index)
    rows.append({"loader": "one-off conversion HDF5 -> uint8 cache (prepare)", "images_per_s": n_all / convert,
                 "cores_busy": float("nan")})
    table = cache.index[cache.index.split == "train"]
    images = place_images(cache.gather(table), device)
    batches_src = TensorBatches(images, table, {c: 0 for c in table.center.unique()}, batch_size, device)
    where = "GPU-resident" if images.device.type == "cuda" else "host memory"
    variants = {  # the naive loader only flips/rotates: the middle row is the like-for-like comparison
        "batch gather": None,
        "batch gather + dihedral": AugCfg(backend="torch", dihedral=True, hed_sigma=0, brightness=0, contrast=0),
        "batch gather + dihedral + HED + brightness/contrast + normalise":
            AugCfg(backend="torch", dihedral=True, hed_sigma=0.05, brightness=0.1, contrast=0.1),
    }
    for label, aug in variants.items():
        def ours():
            done = 0
            while done < batches:
                for b in batches_src:
                    if aug is not None:
                        x = augment_batch(b["image"], aug)
                        if aug.hed_sigma > 0:
                            normalize(x, (0.5,) * 3, (0.5,) * 3, 96)
                    done += 1
                    if done == batches:
                        break
            sync(device)
        ours()
        ips, busy = measure(ours, batches * batch_size)
        rows.append({"loader": f"this repo: uint8 cache in {where}, {label} on {device.type}",
                     "images_per_s": ips, "cores_busy": busy})
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="train patches in the generated dataset")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="few steps (CPU): numbers are rough")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (bench/gpu.sh --smoke): the code runs, the "
                                                         "numbers mean nothing")
    a = ap.parse_args()
    if a.smoke:
        a.n = min(a.n, 600)
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    machine = torch.cuda.get_device_name(0) if gpu else f"{platform.processor() or platform.machine()}, CPU only"
    print(f"machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_dataset(root, a.n)
        print(f"generated {a.n} train patches in {time.perf_counter() - t0:.0f} s", flush=True)
        loaders = bench_loaders(root, device, batches=40 if gpu else (1 if a.smoke else 8 if a.quick else 20),
                                batch_size=32 if a.smoke else 256, smoke=a.smoke)
        for r in loaders:
            print(f"{r['loader']:<95} {r['images_per_s']:>10,.0f} img/s  {r['cores_busy']:.1f} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # rows 2-4: the code that runs (bench/loop.py)
        models = loop.rows(Path(tmp), device, gpu, a.quick, a.smoke)
    for r in models:
        print(
            f"{r['what']:<80} loop {r['loop_img_s']:>9,.1f} img/s  ceiling {r['ceiling_img_s']:>9,.1f} img/s  "
            f"ratio {r['ratio']:.2f}"
            + (f"  85,054 x 8 views: {r['test_85054_x8_s']:,.0f} s" if "test_85054_x8_s" in r else ""),
            flush=True,
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    path = out / f"speed-{'gpu' if gpu else 'cpu'}-{stamp}{'-smoke' if a.smoke else ''}.json"
    path.write_text(json.dumps({"machine": machine, "cores": os.cpu_count(), "date": stamp, "torch": torch.__version__,
                                "loaders": loaders, "models": models}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
