"""The `image` kind: a backbone (timm or a foundation recipe) fine-tuned on images from the cache, augmented on the
device or on CPU workers, through the config's one input transform; adapts to a center by AdaBN."""
from __future__ import annotations

import copy
import json
from functools import partial
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn

from ..config import Config
from ..data.augment import N_VIEWS, random_views, to_float
from ..data.cache import Cache
from ..data.loader import EPOCH_STRIDE, PatchDataset, make_loader, place_images
from ..models.backbone import PatchClassifier
from ..models.robust import apply_robust, robust_identity
from ..paths import Paths
from ..runs import RunDir
from ..safeio import write_json
from ..tta import predict_views
from .base import Streams, domains_of, load_weights, register, save_weights, tensor_streams
from .colour import input_transform


@register
class ImageTask:
    """A fine-tuned backbone on images from the cache."""
    kind: ClassVar[str] = "image"

    def __init__(self, cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator, precision: str):
        self.cfg, self.cache, self.acc, self.precision = cfg, cache, accelerator, precision
        self.domains = domains_of(cache)
        self.preprocess = None  # the model's, once built or loaded
        self.transform, self.colour = input_transform(cfg, cache, paths, accelerator.device)
        self._donors = (None, None)  # infer --fourier: (its FourierTTA, the donor pool on the device)
        self._fourier_loader = (None, None)  # (the table's ids, their loader): read once for every beta
        self.robust_root = paths.robust
        # the tuned backbone (model.robustify) fine-tuning starts from
        self.robust = robust_identity(cfg.model, cache.id, paths.robust) if cfg.model.robustify is not None else None

    def lineage(self) -> dict:
        # the stain GAN's generator and the robustified backbone, when the config uses them
        return {**self.colour, **({"robustify": self.robust} if self.robust else {})}

    def stored_data(self) -> None:
        return None  # images are read from the cache

    def _ready(self, model: PatchClassifier) -> PatchClassifier:
        self.preprocess = model.preprocess
        return model.to(memory_format=torch.channels_last) if self.cfg.train.channels_last else model

    def build_model(self, source: pd.DataFrame | None = None) -> PatchClassifier:
        model = PatchClassifier(self.cfg.model)
        if self.robust:  # LoRA merged: the checkpoint keeps the backbone's own keys (infer needs no peft)
            model.backbone = apply_robust(model.backbone, self.cfg.model, self.robust_root / self.robust["key"])
        return self._ready(model)

    def streams(self, source: pd.DataFrame, target: pd.DataFrame, seed: int) -> Streams:
        t = self.cfg.train
        if self.cfg.aug.backend == "torch":
            place = lambda table: place_images(self.cache.gather(table), self.acc.device, t.placement)  # noqa: E731
            return tensor_streams(self, place, source, target, seed)
        # albumentations: per-item views (and colour jitter without a normaliser) on DataLoader workers, loaders
        # seeded per epoch (Accelerate shards them)
        transform = self.transform.worker_pipeline(seed)
        sets = [(PatchDataset(self.cache.gather(tb), tb, self.domains, transform), bs)
                for tb, bs in ((source, t.batch_size), (target, t.target_batch_size))]
        return Streams(
            lambda e: self.acc.prepare(
                *(
                    make_loader(
                        ds,
                        bs,
                        train=True,
                        num_workers=t.num_workers,
                        seed=seed + k + EPOCH_STRIDE * e,
                        persistent=False,
                    )
                    for k, (ds, bs) in enumerate(sets)
                )
            )
        )

    def _images(self, raw: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> augmented float images in [0, 1] on the device (B x 3 x H x W): the dihedral views
        (the torch backend's, made here; the albumentations workers made theirs), then the config's one input
        transform, the same for both backends (normalise -> jitter -> grayscale)."""
        raw = raw.to(self.acc.device, non_blocking=True)
        views = self.cfg.aug.backend == "torch" and self.cfg.aug.dihedral
        return self.transform.train(random_views(raw) if views else to_float(raw))

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
        return partial(
            predict_views,
            loader=loader,
            accelerator=self.acc,
            views=tuple(range(views or N_VIEWS)),
            desc=desc,
            precision=self.precision,
            channels_last=self.cfg.train.channels_last,
            transform=self.transform.infer,
        )

    @torch.no_grad()
    def features(self, model: nn.Module, table: pd.DataFrame) -> np.ndarray:
        """The fine-tuned backbone's pooled features of the plain view, through the config's input transform."""
        model.eval()
        images, batch = self.cache.gather(table), self.cfg.train.eval_batch_size
        return torch.cat([model(self.to_model(self.transform.infer(to_float(
            torch.from_numpy(images[i:i + batch]).to(self.acc.device)))))["features"].float().cpu()
            for i in range(0, len(images), batch)]).numpy()

    def fourier_predictor(self, table: pd.DataFrame, fourier, beta: float,
                          desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]:
        """Like `predictor`, the views being each patch's Fourier transfers to its nearest donors of other
        training centers (data/donors.py's FourierTTA), nearest first: v0..v{n-1}."""
        if self._donors[0] is not fourier:  # the pool on the device, once a task
            self._donors = fourier, fourier.donors_for(self.cache, self.acc.device, self.transform.infer)
        donors, n = self._donors[1], fourier.donors
        ids = table["id"].to_numpy()
        if self._fourier_loader[0] is None or not np.array_equal(self._fourier_loader[0], ids):
            ds = PatchDataset(self.cache.gather(table), table, self.domains)
            self._fourier_loader = ids, self.acc.prepare(make_loader(ds, self.cfg.train.eval_batch_size, train=False))
        return partial(
            predict_views,
            loader=self._fourier_loader[1],
            accelerator=self.acc,
            desc=desc,
            precision=self.precision,
            channels_last=self.cfg.train.channels_last,
            transform=self.transform.infer,
            make_views=lambda x, centers: donors.views(x, centers, beta, n),
        )

    def save(self, run: RunDir, model: PatchClassifier) -> None:
        save_weights(run, model)
        if self.cfg.model.recipe:  # what the backbone was built as: infer rebuilds it without the hub
            write_json(run.backbone_build, model.backbone.build)

    def load(self, run: RunDir) -> nn.Module:
        build = json.loads(run.backbone_build.read_text()) if run.backbone_build.exists() else None
        model = load_weights(run, PatchClassifier(self.cfg.model, load_weights=False, build=build))
        return self.acc.prepare(self._ready(model.to(self.acc.device)))

    def adapt(self, model: nn.Module, table: pd.DataFrame, source: pd.DataFrame) -> tuple[nn.Module, dict]:
        """AdaBN: a copy whose batch-norm statistics are those of the center's images ('changed': the layers;
        the labelled `source` rows are not needed)."""
        adapted = copy.deepcopy(self.acc.unwrap_model(model))
        n = adapt_batchnorm(adapted, self.cache.gather(table), self.acc.device, transform=self.transform.infer)
        return self.acc.prepare(adapted), {"changed": n, "method": "AdaBN"}


@torch.no_grad()
def adapt_batchnorm(model: PatchClassifier, images: np.ndarray, device: torch.device,
                    batch_size: int = 256, transform=None) -> int:
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
        x = to_float(torch.from_numpy(batch).to(device))
        model(model.preprocess(transform(x) if transform is not None else x))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(bns)
