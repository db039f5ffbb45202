"""The two kinds of model, behind one protocol: what the training engine, the infer stage and the
report need of a model, whatever it learns from.

  ImageTask    fine-tunes a backbone (timm or a foundation recipe) on images from the cache,
               augmented on the device or on CPU workers; adapts to a center by AdaBN.
  FeatureTask  trains a small head on features a fixed backbone stored once (the `embed` stage,
               features.py): a random stored view per step; its TTA views are the stored ones.

The protocol (both classes implement every method; nothing else asks which kind a run is):
  lineage()                     what the task's data were computed from besides the cache (run inputs)
  stored_data()                 the data the task stores before training (a head's feature store, embedded
                                when missing: the `embed` stage); None for images
  build_model(source)           a new model to train (`source`: the fold's labelled rows, None to load one)
  streams(source, target, seed) the labelled and unlabelled batch streams; `.epoch(e)` gives an epoch's
  feed(src, tgt)                one step's inputs for the algorithm (x, y, domain, x_target, ..., images)
  to_model(x)                   augmented images/features -> what the model's forward takes
  predictor(table, views, desc) a callable model -> per-view logits table (id, center, label, v0..)
  save(run, model), load(run)   the trained model to and from the run folder (safetensors, no pickle)
  adapt(model, table, source)   the model adapted to one center without its labels (`source`: the fold's
                                labelled rows, for self-training) and a record: layers/maps/rounds changed
                                (0: nothing to adapt, its predictions stay the plain ones), the method, details
`make_task` is the one place that chooses the kind, from the config; the run records it.
"""
from __future__ import annotations

import copy
import json
from functools import cached_property, partial
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ConfigError, load_config
from .data.augment import N_VIEWS, augment_batch, build_albumentations, to_float
from .data.cache import Cache
from .data.loader import EPOCH_STRIDE, PatchDataset, TensorBatches, make_loader, place_images
from . import stain_gan
from .features import FeatureStore, embed, feature_spec, store_key
from .lineage import StaleError
from .models.backbone import PatchClassifier
from .models.foundation import RecipeError, resolve_recipe
from .models.feature_shift import standardize_per_center
from .models.self_training import SelfTraining
from .models.head import FeatureClassifier
from .paths import Paths
from .precision import config_precision
from .runs import RunDir
from .safeio import atomic, write_json
from .tta import predict_views, view_logits, views_table


def load_experiment(path, overrides=()) -> Config:
    """A config checked against the registries too (the foundation recipe and its overrides)."""
    cfg = load_config(path, overrides)
    if cfg.model.recipe:
        try:
            resolve_recipe(cfg.model.recipe, cfg.model.recipe_overrides)
        except RecipeError as e:
            raise ConfigError(f"model.recipe: {e}") from None
    return cfg


def domains_of(cache: Cache) -> dict[int, int]:
    """Center id -> domain index (the domain head's classes), the same for every run of a cache."""
    return {c: i for i, c in enumerate(sorted(cache.index["center"].unique()))}


class _Streams:
    """Labelled and unlabelled batch streams whose order is a function of (seed, epoch)."""

    def __init__(self, make: Callable[[int], tuple]):
        self._make = make

    def epoch(self, epoch: int) -> tuple:
        return self._make(epoch)


def _tensor_streams(task, tensor_of, source, target, seed: int) -> _Streams:
    """Whole-batch gathers from tensors (device or host memory): no per-item Python work."""
    acc, t = task.acc, task.cfg.train
    streams = [TensorBatches(tensor_of(table), table, task.domains, bs, acc.device, seed + k,
                             acc.process_index, acc.num_processes)
               for k, (table, bs) in enumerate([(source, t.batch_size), (target, t.target_batch_size)])]

    def epoch(e: int):
        for s in streams:
            s.set_epoch(e)
        return tuple(streams)
    return _Streams(epoch)


class ImageTask:
    """A fine-tuned backbone on images from the cache."""
    kind: ClassVar[str] = "image"

    def __init__(self, cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator, precision: str):
        self.cfg, self.cache, self.acc, self.precision = cfg, cache, accelerator, precision
        self.domains = domains_of(cache)
        self.preprocess = None  # the model's, once built or loaded
        self.colour = stain_gan.attach(cfg, cache, paths, accelerator.device)  # aug.stain_norm: gan

    def lineage(self) -> dict:
        return dict(self.colour)  # the stain GAN's generator, when the config uses one

    def stored_data(self) -> None:
        return None  # images are read from the cache

    def _ready(self, model: PatchClassifier) -> PatchClassifier:
        self.preprocess = model.preprocess
        return model.to(memory_format=torch.channels_last) if self.cfg.train.channels_last else model

    def build_model(self, source: pd.DataFrame | None = None) -> PatchClassifier:
        return self._ready(PatchClassifier(self.cfg.model))

    def streams(self, source: pd.DataFrame, target: pd.DataFrame, seed: int) -> _Streams:
        t = self.cfg.train
        if self.cfg.aug.backend == "torch":
            place = lambda table: place_images(self.cache.gather(table), self.acc.device, t.placement)  # noqa: E731
            return _tensor_streams(self, place, source, target, seed)
        # albumentations: per-item transforms on DataLoader workers, loaders seeded per epoch (Accelerate shards them)
        transform = build_albumentations(self.cfg.aug, seed)
        sets = [(PatchDataset(self.cache.gather(tb), tb, self.domains, transform), bs)
                for tb, bs in ((source, t.batch_size), (target, t.target_batch_size))]
        return _Streams(lambda e: self.acc.prepare(*(
            make_loader(ds, bs, train=True, num_workers=t.num_workers, seed=seed + k + EPOCH_STRIDE * e, persistent=False)
            for k, (ds, bs) in enumerate(sets))))

    def _images(self, raw: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> augmented float images in [0, 1] on the device (B x 3 x H x W)."""
        raw = raw.to(self.acc.device, non_blocking=True)
        aug = self.cfg.aug
        return augment_batch(raw, aug) if aug.backend == "torch" else to_float(raw, aug)

    def feed(self, src: dict, tgt: dict | None) -> dict:
        images = [self._images(src["image"])] + ([self._images(tgt["image"])] if tgt is not None else [])
        batch = {"x": self.to_model(images[0]), "y": src["label"], "domain": src["domain"],
                 "images": torch.cat(images) if len(images) > 1 else images[0]}
        if tgt is not None:
            batch.update(x_target=self.to_model(images[1]), domain_target=tgt["domain"])
        return batch

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)  # resize + normalise as the backbone wants
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def predictor(self, table: pd.DataFrame, views: int | None = None,
                  desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]:
        """`views`: 1 (the plain view) or None (the 8 dihedral TTA views); `desc` names the progress bar.
        The loader is built once."""
        ds = PatchDataset(self.cache.gather(table), table, self.domains)
        loader = self.acc.prepare(make_loader(ds, self.cfg.train.eval_batch_size, train=False))
        return partial(predict_views, loader=loader, accelerator=self.acc, views=tuple(range(views or N_VIEWS)), desc=desc,
                       precision=self.precision, channels_last=self.cfg.train.channels_last,
                       aug=self.cfg.aug)

    def save(self, run: RunDir, model: PatchClassifier) -> None:
        _save_weights(run, model)
        if self.cfg.model.recipe:  # what the backbone was built as: infer rebuilds it without the hub
            write_json(run.backbone_build, model.backbone.build)

    def load(self, run: RunDir) -> nn.Module:
        build = json.loads(run.backbone_build.read_text()) if run.backbone_build.exists() else None
        model = _load_weights(run, PatchClassifier(self.cfg.model, load_weights=False, build=build))
        return self.acc.prepare(self._ready(model.to(self.acc.device)))

    def adapt(self, model: nn.Module, table: pd.DataFrame, source: pd.DataFrame) -> tuple[nn.Module, dict]:
        """AdaBN: a copy whose batch-norm statistics are those of the center's images ('changed': the layers;
        the labelled `source` rows are not needed)."""
        adapted = copy.deepcopy(self.acc.unwrap_model(model))
        n = adapt_batchnorm(adapted, self.cache.gather(table), self.acc.device, aug=self.cfg.aug)
        return self.acc.prepare(adapted), {"changed": n, "method": "AdaBN"}


@torch.no_grad()
def adapt_batchnorm(model: PatchClassifier, images: np.ndarray, device: torch.device,
                    batch_size: int = 256, aug=None) -> int:
    """AdaBN (Li et al. 2016): replace every batch-norm layer's running statistics by those of the
    target images (plain view, cumulative average over all of them). Returns the layers adapted.
    The batches are a fixed random permutation of the images: files are often ordered by slide, and
    averaging the variances of homogeneous batches would miss the variance between them."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches (equal batches: over the images)
    was_training = model.training
    model.train()
    order = np.random.default_rng(0).permutation(len(images))
    for i in range(0, len(images), batch_size) if bns else ():
        batch = images[np.sort(order[i:i + batch_size])]  # a copy (sorted: sequential memory-map reads)
        model(model.preprocess(to_float(torch.from_numpy(batch).to(device), aug)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(bns)


class FeatureTask:
    """A head on features a fixed backbone stored once (all 8 views, and HED views of labelled patches)."""
    kind: ClassVar[str] = "feature"

    def __init__(self, cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator, precision: str):
        self.cfg, self.cache, self.acc, self.paths, self.precision = cfg, cache, accelerator, paths, precision
        self.domains = domains_of(cache)
        stain_gan.attach(cfg, cache, paths, accelerator.device)  # aug.stain_norm: gan (the store key holds it)
        self.spec = feature_spec(cfg, cache, precision)  # computed once: one hub lookup per run

    def lineage(self) -> dict:
        """The store's key and, once it is complete, its content stamp (features embedded again differ)."""
        path = self.paths.features / store_key(self.spec)
        done = (path / "meta.json").exists()
        return {"features": store_key(self.spec), **({"features_content": FeatureStore(path).stamp()} if done else {})}

    def stored_data(self) -> FeatureStore:
        return self.store

    @cached_property
    def store(self) -> FeatureStore:
        """The feature store of this spec, embedded on first use when the `embed` stage has not run (after
        the lineage checks, so a stale run is refused before anything is embedded)."""
        return embed(self.cfg, self.cache, self.paths.features, self.acc, self.precision, self.spec)

    def build_model(self, source: pd.DataFrame | None = None) -> FeatureClassifier:
        """A head; with the fold's labelled rows, its feature shift holds their statistics (the training
        centers' pooled moments, or CORAL's source covariance), computed from the stored TTA views."""
        model = FeatureClassifier(self.store.dim, self.cfg.model)
        if source is not None and self.cfg.model.feature_shift != "none":
            model.shift.fit_source([self._tta_rows(group) for _, group in source.groupby("center")])
        return model

    def _tta_rows(self, table: pd.DataFrame) -> torch.Tensor:
        return torch.from_numpy(self.store.rows(table, self.store.views))

    def streams(self, source: pd.DataFrame, target: pd.DataFrame, seed: int) -> _Streams:
        # labelled rows with every stored view (the HED views too), target rows with the TTA views; kept
        # in float16 on the device (a third of the competition x 12 views x 2560 values is 8 GB, not 16).
        # Per-center standardisation: every center's rows by its own moments (the target's too: label-free)
        return _tensor_streams(self, self._inputs, source, target, seed)

    def _view(self, feats: torch.Tensor) -> torch.Tensor:
        """B x V x D stored features -> B x D, one random view per patch (the head's augmentation)."""
        feats = feats.to(self.acc.device)
        pick = torch.randint(0, feats.shape[1], (feats.shape[0],), device=feats.device)
        return feats[torch.arange(feats.shape[0], device=feats.device), pick].float()

    def feed(self, src: dict, tgt: dict | None) -> dict:
        batch = {"x": self._view(src["image"]), "y": src["label"], "domain": src["domain"]}
        if tgt is not None:
            batch.update(x_target=self._view(tgt["image"]), domain_target=tgt["domain"])
        batch["images"] = torch.cat([batch["x"], batch["x_target"]]) if tgt is not None else batch["x"]
        return batch

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def predictor(self, table: pd.DataFrame, views: int | None = None,
                  desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]:
        """`views`: 1 (the plain view) or None (every stored TTA view). The rows are gathered once (no
        progress bar: a head predicts a whole center in well under a second)."""
        feats = torch.from_numpy(self.store.rows(table, views or self.store.views)).to(self.acc.device)
        return lambda model: views_table(table, view_logits(model, feats))

    def save(self, run: RunDir, model: nn.Module) -> None:
        _save_weights(run, model)

    def load(self, run: RunDir) -> nn.Module:
        return _load_weights(run, self.build_model()).to(self.acc.device)

    def _inputs(self, source: pd.DataFrame) -> torch.Tensor:
        """Labelled rows (every stored view) in the head's input space, as training saw them."""
        feats = torch.from_numpy(self.store.rows(source)).to(self.acc.device)
        if self.cfg.model.feature_shift == "standardize":
            feats = standardize_per_center(feats, source["center"].to_numpy())
        return feats

    def adapt(self, model: nn.Module, table: pd.DataFrame, source: pd.DataFrame) -> tuple[nn.Module, dict]:
        """The head adapted to one center from its unlabelled stored views: the feature shift re-estimated on
        them, then (model.self_train_rounds) self-training on its confident predictions beside the fold's
        labelled `source` rows. 'changed' counts the maps re-estimated and the rounds that trained (0 with
        neither: the head keeps no statistics of its inputs and does not self-train)."""
        m = self.cfg.model
        if m.feature_shift == "none" and not m.self_train_rounds:
            return model, {"changed": 0, "method": "none"}
        adapted = copy.deepcopy(self.acc.unwrap_model(model)).eval()
        target = self._tta_rows(table).to(self.acc.device)
        steps = [f"feature shift {m.feature_shift}"] * (m.feature_shift != "none") + \
            [f"self-training x{m.self_train_rounds}"] * bool(m.self_train_rounds)
        record = {"changed": adapted.shift.adapt_to(target), "method": " + ".join(steps)}
        if m.self_train_rounds:
            with torch.no_grad():  # the target through its re-estimated shift, kept in float16 like the streams
                target = torch.cat([adapted.shift(target[i:i + 4096].float()).half() for i in range(0, len(target), 4096)])
            labels = torch.tensor(source["label"].to_numpy(), device=self.acc.device)
            train = SelfTraining(m.self_train_rounds, m.self_train_threshold, self.cfg.optim.lr,
                                 self.cfg.train.batch_size, self.cfg.train.seed)
            record.update(train(adapted, self._inputs(source), labels, target))
            record["changed"] += sum(n > 0 for n in record["self_training"]["pseudo_labelled"])  # rounds that trained
        return self.acc.prepare(adapted), record


TASKS = {ImageTask.kind: ImageTask, FeatureTask.kind: FeatureTask}
Task = ImageTask | FeatureTask


def task_kind(cfg: Config) -> str:
    """The one place the kind of model is chosen: a frozen backbone means a head on stored features."""
    return FeatureTask.kind if cfg.model.frozen else ImageTask.kind


def make_task(cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator) -> Task:
    return TASKS[task_kind(cfg)](cfg, cache, paths, accelerator, config_precision(cfg))


def _save_weights(run: RunDir, model: nn.Module) -> None:
    with atomic(run.checkpoint) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def _load_weights(run: RunDir, model: nn.Module) -> nn.Module:
    """The run's trained weights into `model` (safetensors: nothing is unpickled)."""
    try:
        weights = load_file(str(run.checkpoint))
    except Exception as e:  # safetensors raises its own error type, without the path
        raise StaleError(f"{run.checkpoint}: cannot be read as safetensors ({e}); retrain the run (train --force)") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise StaleError(f"{run.checkpoint}: does not fit the model of {run.config} ({first}); "
                         "retrain the run (train --force)") from None
    return model


def run_task(run: RunDir, cache: Cache, paths: Paths, accelerator: Accelerator) -> tuple[Task, nn.Module]:
    """A finished run's task (the kind it recorded) and its trained model, checked against the current
    cache and, for heads on features, the current feature store."""
    run.check_inputs(cache.digests)
    task = TASKS[run.kind](run.cfg, cache, paths, accelerator, config_precision(run.cfg))
    run.check_lineage(task.lineage())
    return task, task.load(run)


__all__ = ["FeatureTask", "ImageTask", "TASKS", "Task", "adapt_batchnorm", "load_experiment", "make_task",
           "run_task", "task_kind"]
