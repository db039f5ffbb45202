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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .config import Config, save_config, load_config
from .data.augment import augment_batch, build_albumentations, random_hed, to_float
from .data.cache import Cache
from .data.folds import check_folds, read_folds
from .data.loader import EPOCH_STRIDE, PatchDataset, TensorBatches, cycle, make_loader, place_images
from .metrics import per_center
from .models.backbone import PatchClassifier
from .features import FeatureClassifier, embed, feature_spec, random_view, store_key, view_logits, views_table
from .precision import autocast, config_precision
from .tta import PredictionError, check_finite, predict_views
from .lineage import StaleError, changed, digest_file, stack_cache_id
from .runs import RunDir
from .safeio import Lock, atomic, require_free, write_csv, write_json, write_text

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


def pseudo_source(cache: Cache) -> Path:
    """The previous round's test features, after checking they were computed from this cache."""
    stack_dir = cache.dir.parent / "stack"
    path, made_from = stack_dir / "test_features.csv", stack_cache_id(stack_dir)
    if not path.exists() or made_from is None:
        raise FileNotFoundError(f"{path}: pseudo-labels need a finished first round (train, infer, stack)")
    if made_from != cache.id:
        raise StaleError(f"{path}: computed from another cache ({made_from}, now {cache.id}); rerun the first round's "
                         "infer and stack before pseudo-labelling")
    return path


def pseudo_labels(cache: Cache, threshold: float) -> pd.DataFrame:
    """Confident test patches of the previous round's ensemble, as labelled rows (one round)."""
    feats = pd.read_csv(pseudo_source(cache))
    prob = 1 / (1 + np.exp(-feats[[c for c in feats.columns if c.endswith("__mean")]].mean(axis=1)))
    sure = feats.assign(label=(prob >= 0.5).astype(int))[(prob >= threshold) | (prob <= 1 - threshold)]
    index = cache.index
    test = index[(index["split"] == "test") & ~index["aberrant"]].drop(columns="label")
    return test.merge(sure[["id", "label"]], on="id")


def _train_loaders(cfg: Config, cache: Cache, source, target, domain_of_center, seed: int, accelerator: Accelerator):
    """Labelled and unlabelled training batches: per-item albumentations on DataLoader workers (the
    datasets here; `_ImageTask.epoch_loaders` makes each epoch's loaders), or whole-batch gathers from a
    tensor in device or host memory for the torch backend."""
    if cfg.aug.backend == "albumentations":
        transform = build_albumentations(cfg.aug, seed)
        return tuple(PatchDataset(cache.gather(t), t, domain_of_center, transform) for t in (source, target))
    return _tensor_batches(cfg, lambda t: place_images(cache.gather(t), accelerator.device, cfg.train.placement),
                           source, target, domain_of_center, seed, accelerator)


def _tensor_batches(cfg: Config, tensor_of, source, target, domain_of_center, seed: int, accelerator: Accelerator):
    """Labelled and unlabelled batch streams gathered from the tensors that `tensor_of(table)` returns."""
    return tuple(
        TensorBatches(tensor_of(t), t, domain_of_center, bs, accelerator.device, seed + k,
                      accelerator.process_index, accelerator.num_processes)
        for k, (t, bs) in enumerate([(source, cfg.train.batch_size), (target, cfg.train.target_batch_size)]))


INPUT_NAMES = {"cache.train": "the cached train.h5", "cache.val": "the cached val.h5", "cache.test": "the cached test.h5",
               "folds": "folds.csv", "features": "the feature store (new weights, views or cache)",
               "pseudo": "the stack's test predictions it took pseudo-labels from"}


def _what_changed(recorded: dict, current: dict) -> str:
    return ", ".join(INPUT_NAMES.get(k, k) for k in changed(recorded, current))


def prepare_run_dir(run: RunDir, cfg: Config, force: bool, inputs: dict) -> str:
    """'skip', 'resume' or 'fresh'. A finished run with the same config and inputs (cache digests,
    folds, a frozen head's feature store, pseudo-labels) is kept; a finished run with another config
    or other inputs is never overwritten without `force` (then it is moved aside). An unfinished run
    with a saved epoch and the same config and inputs resumes; any other unfinished run starts over."""
    recorded = run.recorded_inputs()
    same_config = run.config.exists() and load_config(run.config).to_dict() == cfg.to_dict()
    if run.is_done:
        if same_config and recorded == inputs and not force:
            print(f"train: {run.path} is done with this config, skipping")
            return "skip"
        if not force:
            what = ("another config" if not same_config else
                    f"other inputs ({_what_changed(recorded, inputs)} changed since)")
            raise FileExistsError(f"{run.path} holds a finished run with {what}; "
                                  "pass --force to move it aside and retrain")
        aside = run.path.with_name(f"{run.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run.path.rename(aside)
        print(f"train: moved the previous run to {aside}")
    elif run.path.exists():
        if same_config and recorded == inputs and run.last_state() is not None and not force:
            return "resume"
        why = "no saved epoch" if same_config and recorded == inputs else "another config or other inputs"
        print(f"train: {run.path} holds an unfinished run ({why}); starting it again")
        shutil.rmtree(run.path)
    return "fresh"


class Progress:
    """The loop's position and history, saved with every epoch's state (Accelerate custom object)."""

    def __init__(self):
        self.epoch, self.step, self.seconds, self.records = 0, 0, 0.0, []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seconds": self.seconds, "records": list(self.records)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.seconds, self.records = (state["epoch"], state["step"], state["seconds"],
                                                             list(state["records"]))


def save_epoch_state(accelerator: Accelerator, run: RunDir, epoch: int, nbytes: int) -> None:
    """Model, optimizer, scheduler, loss scaler, RNG states and progress after `epoch`, in
    run/state-epoch<N>/ with a `complete` marker written last; older states are removed after."""
    folder = run.state_dir(epoch)
    if accelerator.is_main_process:
        require_free(run.path, nbytes, f"saving the epoch {epoch} state")
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / "complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        for old in run.path.glob("state-epoch*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class _ImageTask:
    """Fine-tuning: images from the cache, augmented on workers or on the device."""

    def __init__(self, cfg: Config, cache: Cache, parts, domain_of_center, seed, accelerator, precision):
        source, heldout, target = parts
        self.cfg, self.cache, self.acc, self.precision, self.seed = cfg, cache, accelerator, precision, seed
        self.domain_of_center = domain_of_center
        model = PatchClassifier(cfg.model)
        self.model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
        self.loaders = _train_loaders(cfg, cache, source, target, domain_of_center, seed, accelerator)
        self.heldout = heldout
        self.heldout_loader = None

    def epoch_loaders(self, epoch: int):
        """This epoch's labelled and unlabelled batch streams, their order a function of (seed, epoch)."""
        if self.cfg.aug.backend == "albumentations":  # DataLoaders seeded per epoch; Accelerate shards them
            sizes = (self.cfg.train.batch_size, self.cfg.train.target_batch_size)
            return self.acc.prepare(*(make_loader(ds, bs, train=True, num_workers=self.cfg.train.num_workers,
                                                  seed=self.seed + k + EPOCH_STRIDE * epoch, persistent=False)
                                      for k, (ds, bs) in enumerate(zip(self.loaders, sizes))))
        for stream in self.loaders:
            stream.set_epoch(epoch)
        return self.loaders

    def prepare(self):
        self.heldout_loader = self._loader(self.heldout)
        core = self.acc.unwrap_model(self.model)
        self.preprocess = core.preprocess
        if self.cfg.train.compile:
            core.forward = torch.compile(core.forward)

    def _loader(self, table):
        ds = PatchDataset(self.cache.gather(table), table, self.domain_of_center)
        return self.acc.prepare(make_loader(ds, self.cfg.train.eval_batch_size, train=False))

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> augmented float images in [0, 1] on the device (B x 3 x H x W)."""
        images = images.to(self.acc.device, non_blocking=True)
        aug = self.cfg.aug
        return augment_batch(images, aug) if aug.backend == "torch" else to_float(images, aug.stain_norm)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)  # resize + normalise as the backbone wants
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def altered(self, x: torch.Tensor) -> dict:
        """Stain-AgLr inputs for augmented images x in [0, 1]: their HED-altered copies (model-ready)
        and, for the regeneration loss, x average-pooled to the decoder's side."""
        a = self.cfg.algorithm
        out = {"x_altered": self.to_model(random_hed(x, a.alter_sigma))}
        if a.regen_weight > 0:
            out["regen_target"] = F.adaptive_avg_pool2d(x, a.regen_size)
        return out

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

    def epoch_loaders(self, epoch: int):
        for stream in self.loaders:
            stream.set_epoch(epoch)
        return self.loaders

    def augment(self, feats: torch.Tensor) -> torch.Tensor:
        return random_view(feats.to(self.acc.device)).float()

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def predict(self, model, table: pd.DataFrame | None, desc: str, views: int = 1) -> pd.DataFrame:
        table = self.heldout if table is None else table
        feats = torch.from_numpy(self.store.rows(table, views)).to(self.acc.device)
        return views_table(table, view_logits(model, feats))


def train_fold(cfg: Config, cache_dir, folds_csv, run: RunDir, force: bool = False) -> dict | None:
    precision = config_precision(cfg)
    # bf16 needs no loss scaling: the loop's own autocast does it; fp16 needs Accelerate's scaler
    accelerator = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no")
    # one process trains a run folder at a time (the lock dies with its holder, kill -9 included)
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        return _train_fold(cfg, cache_dir, folds_csv, run, force, accelerator, precision)


def run_inputs(cfg: Config, cache: Cache, folds_csv: Path, spec: dict | None) -> dict:
    """What a run is computed from besides its config (recorded in inputs.json)."""
    inputs = {"cache": cache.digests, "folds": digest_file(folds_csv)}
    if spec:
        inputs["features"] = store_key(spec)
    if cfg.train.pseudo_threshold > 0:
        inputs["pseudo"] = digest_file(pseudo_source(cache))
    return inputs


def _train_fold(cfg: Config, cache_dir, folds_csv, run: RunDir, force: bool, accelerator: Accelerator,
                precision: str) -> dict | None:
    cache = Cache.open(cache_dir)
    folds = read_folds(folds_csv)
    check_folds(folds, cache.index, folds_csv)  # before anything is trained: no leak, no stale ids
    # a head on frozen features depends on the store it was trained on (weights, cache, views...)
    spec = feature_spec(cfg, cache_dir, precision) if cfg.model.frozen else None  # computed once: embed reuses it
    inputs = run_inputs(cfg, cache, folds_csv, spec)
    mode = prepare_run_dir(run, cfg, force, inputs) if accelerator.is_main_process else "fresh"
    modes = accelerator.gather(torch.tensor([("skip", "fresh", "resume").index(mode)], device=accelerator.device))
    mode = ("skip", "fresh", "resume")[int(modes[0])]
    if mode == "skip":
        return None
    seed = cfg.train.seed + 1000 * run.fold
    set_seed(seed, device_specific=True)
    if accelerator.is_main_process and mode == "fresh":
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        write_json(run.inputs, inputs)

    source, heldout, target = split_for_fold(cache.index, folds, run.fold)
    n_pseudo = 0
    if cfg.train.pseudo_threshold > 0:
        extra = pseudo_labels(cache, cfg.train.pseudo_threshold)
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
    src_loader, _ = task.epoch_loaders(0)
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
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in core.parameters())  # weights + two AdamW moments
    if mode == "resume":
        accelerator.load_state(str(run.last_state()))
        accelerator.print(f"train {run.name}: resuming after epoch {progress.epoch} of {cfg.train.epochs} "
                          f"(state saved in {run.last_state()})")
        if accelerator.is_main_process:  # the history as of the saved epoch (a later line may predate the kill)
            write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in progress.records))

    t0 = time.time() - progress.seconds
    oof = None
    for epoch in range(progress.epoch, cfg.train.epochs):
        algorithm.train()
        src_loader, tgt_loader = task.epoch_loaders(epoch)  # the data order is a function of the epoch
        src_iter = cycle(src_loader)
        tgt_iter = cycle(tgt_loader) if core.uses_target else None
        logs: dict[str, list[float]] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{run.name} epoch {epoch + 1}/{cfg.train.epochs}",
                   unit="step", disable=not accelerator.is_local_main_process)
        for _ in bar:
            batch = next(src_iter)
            plain = [task.augment(batch["image"])]
            feed = {"x": task.to_model(plain[0]), "y": batch["label"], "domain": batch["domain"]}
            if tgt_iter is not None:
                tb = next(tgt_iter)
                plain.append(task.augment(tb["image"]))
                feed.update(x_target=task.to_model(plain[1]), domain_target=tb["domain"])
            if core.uses_altered:  # Stain-AgLr: every image again, HED-altered
                feed.update(task.altered(torch.cat(plain) if len(plain) > 1 else plain[0]))
            with autocast(accelerator.device, precision):
                out = algorithm(feed, progress=progress.step / total)
            accelerator.backward(out["loss"])
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(algorithm.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            for k, v in out.items():
                if k != "logits" and v.ndim == 0:
                    logs.setdefault(k, []).append(float(v.detach()))
            bar.set_postfix(loss=f"{np.mean(logs['loss'][-20:]):.3f}")
        if not np.isfinite(logs["loss"]).all():
            raise PredictionError(f"{run.path}: the training loss became non-finite in epoch {epoch + 1} "
                                  f"(step {progress.step}); lower optim.lr or check the inputs - the run is not marked done")
        oof = task.predict(core.model, None, desc="held-out").rename(columns={"v0": "logit"})
        held = per_center(check_finite(oof, f"{run.path} (held-out center {run.fold}, epoch {epoch + 1})")).iloc[0]
        record = {"epoch": epoch + 1, "step": progress.step, "seconds": round(time.time() - t0, 1),
                  "lr_backbone": scheduler.get_last_lr()[0],
                  **{f"train_{k}": round(float(np.mean(v)), 5) for k, v in logs.items()},
                  "heldout_center": run.fold, "heldout_acc": round(held["accuracy"], 5), "heldout_auc": round(held["auc"], 5)}
        accelerator.print(json.dumps(record))
        progress.epoch, progress.seconds = epoch + 1, time.time() - t0
        progress.records.append(record)
        if accelerator.is_main_process:
            with run.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if epoch + 1 < cfg.train.epochs:  # a kill from here on resumes after this epoch
            save_epoch_state(accelerator, run, epoch + 1, state_bytes)
    # every labelled center: the held-out one out of fold (all of it), the training ones in sample
    # (for reference only; a fixed sample of at most IN_SAMPLE_EVAL patches each keeps this cheap)
    labelled = cache.index[cache.index["split"] != "test"]
    full = pd.concat([part if c == run.fold else part.sample(min(len(part), IN_SAMPLE_EVAL), random_state=0)
                      for c, part in labelled.groupby("center")]).reset_index(drop=True)
    table = per_center(task.predict(core.model, full, desc="all labelled").rename(columns={"v0": "logit"}))
    table["held_out"] = table["center"] == run.fold
    summary = None
    if accelerator.is_main_process:
        require_free(run.path, state_bytes // 3, "the checkpoint")
        with atomic(run.checkpoint) as tmp:
            save_file({k: v.contiguous() for k, v in core.model.state_dict().items()}, str(tmp))
        if cfg.model.recipe and not cfg.model.frozen:  # what the backbone was built as: infer rebuilds it offline
            write_json(run.backbone_build, core.model.backbone.build)
        write_csv(run.oof, oof, float_format="%.6g")
        if cfg.model.frozen:  # the stored views make TTA free: write what the infer stage would
            test = cache.index[cache.index["split"] == "test"]
            for rows, part in ((None, "heldout"), (test, "test")):
                views = check_finite(task.predict(core.model, rows, desc="tta", views=task.store.views), str(run.tta_path(part)))
                run.write_tta(part, False, views.assign(label=-1 if rows is not None else views["label"]), cache.id)
        summary = {"run": run.name, "fold": run.fold, "seconds": round(time.time() - t0, 1),
                   "heldout_accuracy": float(held["accuracy"]), "heldout_auc": float(held["auc"]),
                   "pseudo_labels": n_pseudo, "per_center": table.to_dict(orient="records")}
        write_json(run.summary, summary)
        write_text(run.done, time.strftime("%Y-%m-%d %H:%M:%S\n"))
        for state in run.path.glob("state-epoch*"):  # done: the resumable states have served
            shutil.rmtree(state, ignore_errors=True)
        accelerator.print(table.to_string(index=False))
    accelerator.wait_for_everyone()
    return summary
