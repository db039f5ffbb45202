"""The code that runs, timed beside its model-only ceiling (bench/speed.py's rows 2-4; bench/gpu.sh runs them).

  engine.fit   the real training loop (streams, task.feed, the algorithm, Accelerate's backward, optimizer and
               scheduler, logging) on an ImageTask and on a FeatureTask, per step: two fits of 2 and 2 + S steps
               differenced, so setup and the held-out prediction cancel
  Embedder     the embed stage's embedder over uint8 patches (8 views, one forward per batch, autocast)
  TTA          the infer stage's predictor (ImageTask.predictor: loader, 8 dihedral views, autocast)

Each ceiling is the same model on the same batch, measured in the same run: for training, the algorithm's forward
+ backward + optimizer step on one batch made once (no gather, augmentation, scheduler or logging); for the embedder
and TTA, the model's forward on the views stacked once. The ratio is loop / ceiling in images per second.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from accelerate import Accelerator  # noqa: E402

from histoshift.algorithms import ALGORITHMS  # noqa: E402
from histoshift.cli import main as cli  # noqa: E402
from histoshift.config import validated  # noqa: E402
from histoshift.data.augment import to_float  # noqa: E402
from histoshift.data.cache import Cache  # noqa: E402
from histoshift.engine import build_optimizer, fit  # noqa: E402
from histoshift.features.embedder import Embedder  # noqa: E402
from histoshift.paths import Paths  # noqa: E402
from histoshift.precision import autocast, config_precision  # noqa: E402
from histoshift.runs import RunDir  # noqa: E402
from histoshift.tasks import make_task  # noqa: E402
from histoshift.tta import CPU_CHUNK, view_stack  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def demo_root(root: Path, per_center: int) -> Paths:
    """A prepared root with folds: the demo data's five centers (`per_center` patches each) through the stages."""
    for args in (["demo-data", "--per-center", str(per_center), "--test-size", str(per_center)], ["prepare"],
                 ["folds"]):
        if cli(["--root", str(root), *args]):
            raise SystemExit(f"speed: `histoshift {' '.join(args)}` failed")
    return Paths(root)


def image_config(backbone: str, size: int, batch: int) -> dict:
    return {
        "name": "speed-image",
        "model": {"kind": "image", "backbone": backbone, "weights": "none", "input_size": size},
        "algorithm": {"name": "dann", "domain_weight": 0.1},
        "train": {"epochs": 1, "batch_size": batch, "target_batch_size": batch // 2, "eval_batch_size": batch},
    }


def feature_config(batch: int) -> dict:
    """The shipped foundation configs' head (MLP 512, per-center standardisation, DANN) on a store of
    synthetic features (bench/scale.py's writer)."""
    return {"name": "speed-head", "model": {"kind": "feature", "backbone": "resnet18", "weights": "none",
                                            "head_hidden": 512, "feature_shift": "standardize"},
            "algorithm": {"name": "dann", "domain_weight": 0.1},
            "train": {"epochs": 1, "batch_size": batch, "target_batch_size": batch // 2}}


def synthetic_store(paths: Paths, config: dict, dim: int) -> None:
    from scale import Features, write_store  # bench/scale.py: the store's own writer

    index = Cache.open(paths.cache).index
    tables = {s: g.assign(id=g["id"].astype(str))[["id", "center", "label"]] for s, g in index.groupby("split")}
    path = paths.root / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    write_store(paths.root, path, tables, Features(dim, 8, 0))


class Bench:
    """One config's task on a prepared root, with the fold's source and target rows (held-out center 0)."""

    def __init__(self, paths: Paths, config: dict, device: torch.device):
        self.cfg, self.paths, self.device = validated(config), paths, device
        self.precision = config_precision(self.cfg)
        self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if self.precision == "fp16" else "no")
        self.task = make_task(self.cfg, Cache.open(paths.cache), paths, self.acc)
        self.task.stored_data()
        index = self.task.cache.index
        self.source = index[(index["split"] != "test") & (index["center"] != 0) & ~index["aberrant"]]
        self.target = index[index["split"] == "test"]

    def _algorithm(self, cfg):
        algorithm = ALGORITHMS[cfg.algorithm.name](self.task.build_model(self.source), len(self.task.domains), cfg)
        algorithm.observe(self.source, self.target, self.task.domains)
        return algorithm

    def fit_seconds(self, steps: int) -> float:
        train = self.cfg.train.model_copy(update={"steps_per_epoch": steps, "epochs": 1})
        cfg = self.cfg.model_copy(update={"train": train})
        run = RunDir.of(self.paths.runs, f"speed-{steps}", 0, 0)
        run.path.mkdir(parents=True, exist_ok=True)
        held = self.task.predictor(self.source.head(8), views=1, desc="held-out")
        algorithm, streams = self._algorithm(cfg), self.task.streams(self.source, self.target, 0)
        sync(self.device)
        t0 = time.perf_counter()
        fit(cfg, self.task, algorithm, streams, held, self.acc, run, self.precision, resume=False)
        sync(self.device)
        return time.perf_counter() - t0

    def training(self, steps: int, rounds: int = 3) -> dict:
        """engine.fit's seconds per step (fits of 2 and 2 + steps differenced) against the ceiling."""
        self.fit_seconds(2)  # warm-up
        algorithm = self._algorithm(self.cfg)
        optimizer = build_optimizer(self.cfg.optim, algorithm.param_groups())
        algorithm, optimizer = self.acc.prepare(algorithm, optimizer)
        core = self.acc.unwrap_model(algorithm)
        src, tgt = self.task.streams(self.source, self.target, 0).epoch(0)
        batch = self.task.feed(next(iter(src)), next(iter(tgt)) if core.uses_target else None)
        batch = core.extend_batch(batch, self.task.to_model)

        def step():
            with autocast(self.device, self.precision):
                out = algorithm(batch, progress=0.5)
            self.acc.backward(out["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timed(step, 2, 1, self.device, repeats=1)  # warm-up
        loop, ceiling = float("inf"), float("inf")
        for _ in range(rounds):  # interleaved, the best of each: a shared machine's noise hits both alike
            loop = min(loop, (self.fit_seconds(2 + steps) - self.fit_seconds(2)) / steps)
            ceiling = min(ceiling, timed(step, 0, steps, self.device, repeats=1))
        images = self.cfg.train.batch_size
        return {"loop_img_s": images / loop, "ceiling_img_s": images / ceiling, "ratio": ceiling / loop}


def timed(fn, warmup: int, n: int, device: torch.device, repeats: int = 3) -> float:
    """Seconds per call of fn after `warmup` calls: the best of `repeats` runs of n calls (a shared machine only
    ever slows a run down)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def embedder_row(paths: Paths, backbone: str, size: int, device: torch.device, patches: int) -> dict:
    """The Embedder of a frozen-feature config on `backbone` over `patches` uint8 test patches (8 views) against the
    backbone's forward on the same views stacked once, batch for batch."""
    from histoshift.models.backbone import PatchClassifier
    from histoshift.tasks.colour import input_transform

    config = feature_config(32)
    config["model"].update(backbone=backbone, input_size=size)
    cfg = validated(config)
    precision, cache = config_precision(cfg), Cache.open(paths.cache)
    transform, _ = input_transform(cfg, cache, paths, device)
    model = PatchClassifier(cfg.model, load_weights=False).eval().to(device)
    embedder = Embedder(model.backbone, model.preprocess, cfg, transform, device, precision)
    images = np.ascontiguousarray(cache.images("test")[:patches])
    loop = timed(lambda: embedder(images, 8, 0), 1, 1, device)
    per = embedder.batch
    stacked = [view_stack(transform.infer(to_float(torch.from_numpy(images[i:i + per]).to(device))),
                          range(8), model.preprocess) for i in range(0, patches, per)]

    @torch.no_grad()
    def forward():
        with autocast(device, precision):
            for x in stacked:
                model.backbone(x)
    ceiling = timed(forward, 1, 1, device)
    return {"loop_img_s": 8 * patches / loop, "ceiling_img_s": 8 * patches / ceiling, "ratio": ceiling / loop,
            "batch": per, "precision": precision}


def tta_row(b: Bench, patches: int) -> dict:
    """The infer stage's 8-view TTA (ImageTask.predictor) over `patches` test patches against the model's forward on
    the views stacked once, at the predictor's batch."""
    model = b.acc.prepare(b.task.build_model().to(b.device).eval())
    table = b.target.head(patches)
    predict = b.task.predictor(table, views=None, desc="tta")
    loop = timed(lambda: predict(model), 1, 1, b.device)
    per = b.cfg.train.eval_batch_size
    images = b.task.cache.gather(table)
    core = b.acc.unwrap_model(model)
    chunk = CPU_CHUNK if b.device.type == "cpu" else 1 << 30  # the predictor's forwards: the same sizes, layout
    layout = torch.channels_last if b.cfg.train.channels_last else torch.contiguous_format
    stacked = [view_stack(b.task.transform.infer(to_float(torch.from_numpy(images[i:i + per]).to(b.device))),
                          range(8), core.preprocess).contiguous(memory_format=layout) for i in range(0, patches, per)]

    @torch.no_grad()
    def forward():
        with autocast(b.device, b.precision):
            for x in stacked:
                for part in x.split(chunk):
                    core(part)
    ceiling = timed(forward, 1, 1, b.device)
    return {"loop_img_s": 8 * patches / loop, "ceiling_img_s": 8 * patches / ceiling, "ratio": ceiling / loop,
            "test_85054_x8_s": 85_054 * loop / patches}


def rows(root: Path, device: torch.device, gpu: bool, quick: bool, smoke: bool = False) -> list[dict]:
    """Every row: engine.fit on an image task and on a feature task, the Embedder, the TTA predictor. `smoke`: tiny
    sizes (the code runs; the numbers mean nothing)."""
    paths = demo_root(root, 60 if smoke else 400)  # the feature task trains batches of 256
    steps = 1 if smoke else 20 if gpu else (3 if quick else 6)
    patches = 4 if smoke else 256 if gpu else 64
    out = []
    images = [("resnet50", 96, 256), ("vit_base_patch16_224", 224, 128)] if gpu else [("tf_efficientnet_lite0", 96, 32)]
    for backbone, size, batch in images[:1] if smoke else images:
        batch = 8 if smoke else batch
        b = Bench(paths, image_config(backbone, size, batch), device)
        out.append({"what": f"engine.fit, image task, {backbone} @ {size}, DANN", "batch": batch,
                    "precision": b.precision, **b.training(steps, 1 if smoke else 3)})
        out.append({"what": f"infer TTA (8 views), {backbone} @ {size}", "batch": batch, "precision": b.precision,
                    **tta_row(b, patches)})
        out.append({"what": f"Embedder (8 views), {backbone} @ {size}",
                    **embedder_row(paths, backbone, size, device, patches)})
    batch, dim = (32, 64) if smoke else (256, 1536)
    config = feature_config(batch)
    synthetic_store(paths, config, dim)
    b = Bench(paths, config, device)
    out.append({"what": f"engine.fit, feature task, MLP 512 head on {dim} x 8 stored views, DANN, standardize",
                "batch": batch, "precision": b.precision, **b.training(steps * 10, 1 if smoke else 3)})
    return out
