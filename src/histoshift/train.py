"""Stage `train`: one fold of one experiment under Hugging Face Accelerate.

The loop owns optimisation (AdamW with per-part learning rates, warm-up + cosine, gradient
clipping, mixed precision through Accelerate); the algorithm only computes outputs and losses.
Fold k holds out center k: its labelled patches are predicted out of fold and never used for
model selection (the final epoch's weights are kept). Runs on one CPU, one GPU, or many
processes with `accelerate launch`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .config import Config, save_config, load_config
from .data.augment import augment_batch, build_albumentations, to_float
from .data.cache import Cache
from .data.folds import read_folds
from .data.loader import PatchDataset, TensorBatches, cycle, make_loader, place_images
from .metrics import per_center
from .models.backbone import PatchClassifier
from .features import FeatureClassifier, embed, feature_spec, random_view, store_key, view_logits, views_table
from .precision import autocast, config_precision
from .predict import check_finite, predict_views
from .runs import RunDir

IN_SAMPLE_EVAL = 2000


def warmup_cosine(total_steps: int, warmup_frac: float):
    warmup = max(1, int(round(total_steps * warmup_frac)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def split_for_fold(index: pd.DataFrame, folds: pd.DataFrame, fold: int):
    """Labelled training rows, held-out rows and unlabelled target rows of one fold."""
    labelled = index[index["split"] != "test"].merge(folds[["id", "fold"]], on="id", how="left")
    if labelled["fold"].isna().any():
        missing = labelled.loc[labelled["fold"].isna(), "id"].head(3).tolist()
        raise ValueError(f"folds file does not match the cache: ids {missing} have no fold; rebuild the folds")
    if fold not in set(labelled["fold"]):
        raise ValueError(f"fold {fold} does not exist (folds: {sorted(labelled['fold'].unique())})")
    source = labelled[(labelled["fold"] != fold) & ~labelled["aberrant"]]
    heldout = labelled[labelled["fold"] == fold]
    target = pd.concat([heldout, index[index["split"] == "test"]])
    target = target[~target["aberrant"]]
    return source.reset_index(drop=True), heldout.reset_index(drop=True), target.reset_index(drop=True)


def pseudo_labels(index: pd.DataFrame, stack_dir: Path, threshold: float) -> pd.DataFrame:
    """Confident test patches of the previous round's ensemble, as labelled rows (one round)."""
    path = Path(stack_dir) / "test_features.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: pseudo-labels need a finished first round (train, infer, stack)")
    feats = pd.read_csv(path)
    prob = 1 / (1 + np.exp(-feats[[c for c in feats.columns if c.endswith("__mean")]].mean(axis=1)))
    sure = feats.assign(label=(prob >= 0.5).astype(int))[(prob >= threshold) | (prob <= 1 - threshold)]
    test = index[(index["split"] == "test") & ~index["aberrant"]].drop(columns="label")
    return test.merge(sure[["id", "label"]], on="id")


def _train_loaders(cfg: Config, cache: Cache, source, target, domain_of_center, seed: int, accelerator: Accelerator):
    """Labelled and unlabelled training batches: per-item albumentations on DataLoader workers, or
    whole-batch gathers from a tensor in device or host memory for the torch backend."""
    if cfg.aug.backend == "albumentations":
        transform = build_albumentations(cfg.aug, seed)
        return tuple(
            make_loader(PatchDataset(cache.gather(t), t, domain_of_center, transform), bs, train=True,
                        num_workers=cfg.train.num_workers, seed=seed + k)
            for k, (t, bs) in enumerate([(source, cfg.train.batch_size), (target, cfg.train.target_batch_size)]))
    return _tensor_batches(cfg, lambda t: place_images(cache.gather(t), accelerator.device, cfg.train.placement),
                           source, target, domain_of_center, seed, accelerator)


def _tensor_batches(cfg: Config, tensor_of, source, target, domain_of_center, seed: int, accelerator: Accelerator):
    """Labelled and unlabelled batch streams gathered from the tensors that `tensor_of(table)` returns."""
    return tuple(
        TensorBatches(tensor_of(t), t, domain_of_center, bs, accelerator.device, seed + k,
                      accelerator.process_index, accelerator.num_processes)
        for k, (t, bs) in enumerate([(source, cfg.train.batch_size), (target, cfg.train.target_batch_size)]))


def prepare_run_dir(run: RunDir, cfg: Config, force: bool, inputs: dict | None = None) -> bool:
    """True when the run must be trained. A finished run with the same config and inputs (a frozen
    head: the feature store it was trained on) is kept; a finished run with another config or other
    inputs is never overwritten without `force` (then it is moved aside)."""
    if run.is_done:
        same_inputs = (json.loads(run.inputs.read_text()) if run.inputs.exists() else {}) == (inputs or {})
        if load_config(run.config).to_dict() == cfg.to_dict() and same_inputs and not force:
            print(f"train: {run.path} is done with this config, skipping")
            return False
        if not force:
            what = "another config" if same_inputs else "other inputs (its feature store changed: new weights or cache)"
            raise FileExistsError(f"{run.path} holds a finished run with {what}; "
                                  "pass --force to move it aside and retrain")
        aside = run.path.with_name(f"{run.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run.path.rename(aside)
        print(f"train: moved the previous run to {aside}")
    elif run.path.exists():
        print(f"train: {run.path} holds an unfinished run; starting it again")
        shutil.rmtree(run.path)
    return True


class _ImageTask:
    """Fine-tuning: images from the cache, augmented on workers or on the device."""

    def __init__(self, cfg: Config, cache: Cache, parts, domain_of_center, seed, accelerator, precision):
        source, heldout, target = parts
        self.cfg, self.cache, self.acc, self.precision = cfg, cache, accelerator, precision
        self.domain_of_center = domain_of_center
        model = PatchClassifier(cfg.model)
        self.model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
        self.loaders = _train_loaders(cfg, cache, source, target, domain_of_center, seed, accelerator)
        self.heldout = heldout
        self.heldout_loader = None

    def prepare(self):
        if self.cfg.aug.backend == "albumentations":  # DataLoaders: Accelerate shards them
            self.loaders = self.acc.prepare(*self.loaders)
        self.heldout_loader = self._loader(self.heldout)
        core = self.acc.unwrap_model(self.model)
        self.preprocess = core.preprocess
        if self.cfg.train.compile:
            core.forward = torch.compile(core.forward)

    def _loader(self, table):
        ds = PatchDataset(self.cache.gather(table), table, self.domain_of_center)
        return self.acc.prepare(make_loader(ds, self.cfg.train.eval_batch_size, train=False))

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.acc.device, non_blocking=True)
        aug = self.cfg.aug
        x = augment_batch(images, aug) if aug.backend == "torch" else to_float(images, aug.stain_norm)
        x = self.preprocess(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def predict(self, model, table: pd.DataFrame | None, desc: str) -> pd.DataFrame:
        """Plain-view logits of `table` (None: the held-out center): id, center, label, v0."""
        loader = self.heldout_loader if table is None else self._loader(table)
        return predict_views(model, loader, self.acc, views=(0,), desc=desc,
                             precision=self.precision, channels_last=self.cfg.train.channels_last,
                             stain_norm=self.cfg.aug.stain_norm)


class _FeatureTask:
    """Frozen backbone: a head on stored features (all 8 views), a random view per step."""

    def __init__(self, cfg: Config, cache: Cache, parts, domain_of_center, seed, accelerator, precision, spec: dict):
        source, heldout, target = parts
        self.acc, self.heldout = accelerator, heldout
        self.store = embed(cfg, cache, cache.dir.parent / "features", accelerator, precision, spec)
        self.model = FeatureClassifier(self.store.dim, cfg.model)
        # labelled rows with every stored view (the HED views too), target rows with the TTA views; kept
        # in float16 on the device (a third of the competition x 12 views x 2560 values is 8 GB, not 16)
        self.loaders = _tensor_batches(cfg, lambda t: torch.from_numpy(self.store.rows(t)).to(accelerator.device),
                                       source, target, domain_of_center, seed, accelerator)

    def prepare(self):
        pass

    def model_input(self, feats: torch.Tensor) -> torch.Tensor:
        return random_view(feats.to(self.acc.device)).float()

    def predict(self, model, table: pd.DataFrame | None, desc: str, views: int = 1) -> pd.DataFrame:
        table = self.heldout if table is None else table
        feats = torch.from_numpy(self.store.rows(table, views)).to(self.acc.device)
        return views_table(table, view_logits(model, feats))


def train_fold(cfg: Config, cache_dir, folds_csv, run: RunDir, force: bool = False) -> dict | None:
    precision = config_precision(cfg)
    # bf16 needs no loss scaling: the loop's own autocast does it; fp16 needs Accelerate's scaler
    accelerator = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no")
    # a head on frozen features depends on the store it was trained on (weights, cache, views...)
    spec = feature_spec(cfg, cache_dir, precision) if cfg.model.frozen else None  # computed once: embed reuses it
    inputs = {"features": store_key(spec)} if spec else {}
    must_train = prepare_run_dir(run, cfg, force, inputs) if accelerator.is_main_process else True
    must_train = bool(accelerator.gather(torch.tensor([must_train], device=accelerator.device)).all())
    if not must_train:
        return None
    seed = cfg.train.seed + 1000 * run.fold
    set_seed(seed, device_specific=True)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        run.inputs.write_text(json.dumps(inputs))

    cache = Cache.open(cache_dir)
    source, heldout, target = split_for_fold(cache.index, read_folds(folds_csv), run.fold)
    n_pseudo = 0
    if cfg.train.pseudo_threshold > 0:
        extra = pseudo_labels(cache.index, Path(cache_dir).parent / "stack", cfg.train.pseudo_threshold)
        n_pseudo = len(extra)
        source = pd.concat([source, extra[source.columns.intersection(extra.columns)]], ignore_index=True)
        accelerator.print(f"train {run.name}: + {n_pseudo} pseudo-labelled test patches "
                          f"(ensemble probability beyond {cfg.train.pseudo_threshold})")
    parts = (source, heldout, target)
    centers = sorted(cache.index["center"].unique())
    domain_of_center = {c: i for i, c in enumerate(centers)}
    accelerator.print(f"train {run.name}: {len(source)} labelled patches from centers "
                      f"{sorted(int(c) for c in source['center'].unique())}, held-out center {run.fold} ({len(heldout)}), "
                      f"{len(target)} unlabelled target patches, precision {precision}"
                      + (", frozen backbone (head on cached features)" if cfg.model.frozen else ""))

    if cfg.model.frozen:
        task = _FeatureTask(cfg, cache, parts, domain_of_center, seed, accelerator, precision, spec)
    else:
        task = _ImageTask(cfg, cache, parts, domain_of_center, seed, accelerator, precision)
    algorithm = ALGORITHMS[cfg.algorithm.name](task.model, len(centers), cfg)
    optimizer = torch.optim.AdamW(algorithm.param_groups(), weight_decay=cfg.optim.weight_decay)
    algorithm, optimizer = accelerator.prepare(algorithm, optimizer)
    core = accelerator.unwrap_model(algorithm)
    task.model = core.model
    task.prepare()
    src_loader, tgt_loader = task.loaders
    if len(src_loader) == 0:
        raise ValueError(f"fold {run.fold}: fewer labelled patches ({len(source)}) than one batch")
    steps_per_epoch = cfg.train.steps_per_epoch or len(src_loader)
    total = steps_per_epoch * cfg.train.epochs
    factor = warmup_cosine(total, cfg.optim.warmup_frac)
    probe_steps = cfg.train.probe_epochs * steps_per_epoch  # linear probe first: backbone lr 0

    def backbone_factor(step: int) -> float:
        return 0.0 if step < probe_steps else factor(step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [backbone_factor if g.get("name") == "backbone" else factor for g in optimizer.param_groups])

    src_iter = cycle(src_loader)
    tgt_iter = cycle(tgt_loader) if core.uses_target else None
    step, t0 = 0, time.time()
    for epoch in range(cfg.train.epochs):
        algorithm.train()
        logs: dict[str, list[float]] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{run.name} epoch {epoch + 1}/{cfg.train.epochs}",
                   unit="step", disable=not accelerator.is_local_main_process)
        for _ in bar:
            batch = next(src_iter)
            feed = {"x": task.model_input(batch["image"]), "y": batch["label"], "domain": batch["domain"]}
            if tgt_iter is not None:
                tb = next(tgt_iter)
                feed.update(x_target=task.model_input(tb["image"]), domain_target=tb["domain"])
            with autocast(accelerator.device, precision):
                out = algorithm(feed, progress=step / total)
            accelerator.backward(out["loss"])
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(algorithm.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k, v in out.items():
                if k != "logits" and v.ndim == 0:
                    logs.setdefault(k, []).append(float(v.detach()))
            bar.set_postfix(loss=f"{np.mean(logs['loss'][-20:]):.3f}")
        oof = task.predict(core.model, None, desc="held-out").rename(columns={"v0": "logit"})
        held = per_center(oof).iloc[0]
        record = {"epoch": epoch + 1, "step": step, "seconds": round(time.time() - t0, 1),
                  "lr_backbone": scheduler.get_last_lr()[0],
                  **{f"train_{k}": round(float(np.mean(v)), 5) for k, v in logs.items()},
                  "heldout_center": run.fold, "heldout_acc": round(held["accuracy"], 5), "heldout_auc": round(held["auc"], 5)}
        accelerator.print(json.dumps(record))
        if accelerator.is_main_process:
            with run.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")

    # every labelled center: the held-out one out of fold (all of it), the training ones in sample
    # (for reference only; a fixed sample of at most IN_SAMPLE_EVAL patches each keeps this cheap)
    labelled = cache.index[cache.index["split"] != "test"]
    full = pd.concat([part if c == run.fold else part.sample(min(len(part), IN_SAMPLE_EVAL), random_state=0)
                      for c, part in labelled.groupby("center")]).reset_index(drop=True)
    table = per_center(task.predict(core.model, full, desc="all labelled").rename(columns={"v0": "logit"}))
    table["held_out"] = table["center"] == run.fold
    check_finite(oof, f"{run.path} (held-out center {run.fold})")  # a diverged run is never marked done
    summary = None
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in core.model.state_dict().items()}, str(run.checkpoint))
        if cfg.model.recipe and not cfg.model.frozen:  # what the backbone was built as: infer rebuilds it offline
            run.backbone_build.write_text(json.dumps(core.model.backbone.build, indent=2))
        oof.to_csv(run.oof, index=False, float_format="%.6g")
        if cfg.model.frozen:  # the stored views make TTA free: write what the infer stage would
            test = cache.index[cache.index["split"] == "test"]
            for rows, path in ((None, run.tta_heldout), (test, run.tta_test)):
                views = check_finite(task.predict(core.model, rows, desc="tta", views=task.store.views), str(path))
                views.assign(label=-1 if rows is not None else views["label"]).to_csv(path, index=False, float_format="%.6g")
        summary = {"run": run.name, "fold": run.fold, "seconds": round(time.time() - t0, 1),
                   "heldout_accuracy": float(held["accuracy"]), "heldout_auc": float(held["auc"]),
                   "pseudo_labels": n_pseudo, "per_center": table.to_dict(orient="records")}
        run.summary.write_text(json.dumps(summary, indent=2))
        run.done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        accelerator.print(table.to_string(index=False))
    accelerator.wait_for_everyone()
    return summary
