"""The `feature` kind: a small head on features a fixed backbone stored once (the `embed` stage, features/): a
random stored view per step; its TTA views are the stored ones; adapts to a center by re-estimating its feature
shift and, when its config says so, self-training."""
from __future__ import annotations

import copy
from functools import cached_property
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn

from ..config import Config
from ..data.cache import Cache
from ..features.embedder import embed
from ..features.rows import TableRows
from ..features.store import FeatureStore, feature_spec, fourier_spec, store_key
from ..models.robust import robust_identity
from ..models.feature_shift import moments
from ..models.head import FeatureClassifier
from ..models.self_training import SelfTraining
from ..paths import Paths
from ..runs import RunDir
from ..tta import view_logits, views_table
from .base import Streams, domains_of, load_weights, register, save_weights, tensor_streams
from .colour import input_transform


@register
class FeatureTask:
    """A head on features a fixed backbone stored once (all 8 views, and HED views of labelled patches)."""
    kind: ClassVar[str] = "feature"

    def __init__(self, cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator, precision: str):
        self.cfg, self.cache, self.acc, self.paths, self.precision = cfg, cache, accelerator, paths, precision
        self.domains = domains_of(cache)
        # the embedding's input transform (stain normalisation, grayscale; the store key holds the generator's id)
        self.transform, colour = input_transform(cfg, cache, paths, accelerator.device)
        # the tuned backbone (model.robustify) of this cache: its identity keys the store
        self.robust = robust_identity(cfg.model, cache.id, paths.robust) if cfg.model.robustify is not None else None
        self.spec = feature_spec(
            cfg, cache, precision, colour.get("stain_gan"), self.robust
        )  # once: one hub lookup per run

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
        robust = self.paths.robust / self.robust["key"] if self.robust else None
        return embed(self.cfg, self.cache, self.paths.features, self.acc, self.precision, self.transform, self.spec,
                     robust)

    def build_model(self, source: pd.DataFrame | None = None) -> FeatureClassifier:
        """A head; with the fold's labelled rows, its feature shift holds their statistics (the training
        centers' pooled moments, or CORAL's source covariance), computed from the stored TTA views."""
        model = FeatureClassifier(self.store.dim, self.cfg.model)
        if source is not None and self.cfg.model.feature_shift != "none":
            model.shift.fit_source([self._tta_rows(group) for _, group in source.groupby("center")])
        return model

    @property
    def stat_views(self) -> int:
        """The one rule for which views feed every statistic (the shift's source and target moments, CORAL's
        covariances, training's per-center standardisation): the TTA views every split has, never the extra HED
        views only labelled patches have."""
        return self.store.views

    def _tta_rows(self, table: pd.DataFrame) -> TableRows:
        """The table's stat views, read from disk a chunk at a time onto the device (statistics never hold a
        whole center)."""
        return TableRows(self.store, table, self.stat_views, chunk_device=self.acc.device)

    def streams(self, source: pd.DataFrame, target: pd.DataFrame, seed: int) -> Streams:
        # labelled rows with every stored view (the HED views too), target rows with the TTA views, read from
        # the store a batch at a time (memory bounded by the batch, not the store: 5-11 GB at the competition's
        # size). Per-center standardisation: every center's rows by its own moments (the target's too: label-free)
        # one random stored view of each patch (the head's augmentation), chosen before the read: 1/V of the bytes
        return tensor_streams(self, self._inputs, source, target, seed, one_view=True)

    def feed(self, src: dict, tgt: dict | None) -> dict:
        """B x D batches (one view of each patch, drawn by the streams) as float32 on the device."""
        batch = {"x": src["image"].to(self.acc.device).float(), "y": src["label"], "domain": src["domain"]}
        if tgt is not None:
            batch.update(x_target=tgt["image"].to(self.acc.device).float(), domain_target=tgt["domain"])
        batch["images"] = torch.cat([batch["x"], batch["x_target"]]) if tgt is not None else batch["x"]
        return batch

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def predictor(self, table: pd.DataFrame, views: int | None = None,
                  desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]:
        """`views`: 1 (the plain view) or None (every stored TTA view). The rows are gathered once (no
        progress bar: a head predicts a whole center in well under a second)."""
        return self._predictor(self.store, table, views)

    def _predictor(
        self, store: FeatureStore, table: pd.DataFrame, views: int | None
    ) -> Callable[[nn.Module], pd.DataFrame]:
        rows = TableRows(store, table, views or store.views, chunk_device=self.acc.device)

        def predict(model: nn.Module) -> pd.DataFrame:  # a chunk of the store at a time
            logits = [view_logits(model, chunk) for chunk in rows.chunks()]
            return views_table(table, np.concatenate(logits) if logits else np.zeros((0, rows.views), np.float32))
        return predict

    @torch.no_grad()
    def features(self, model: nn.Module, table: pd.DataFrame) -> np.ndarray:
        """The head's input features of the stored plain view (after its feature shift; an MLP's hidden layer)."""
        model.eval()
        rows = TableRows(self.store, table, 1, chunk_device=self.acc.device)
        out = [model(chunk[:, 0].float())["features"].float().cpu() for chunk in rows.chunks()]
        return torch.cat(out).numpy() if out else np.zeros((0, self.store.dim), np.float32)

    def fourier_predictor(self, table: pd.DataFrame, fourier, beta: float,
                          desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]:
        """Like `predictor`, on the store of this backbone's Fourier transfers (embedded on first use, shared by
        every head and fold on the backbone): each patch's views are its transfers to its nearest donors of
        other training centers (data/donors.py), nearest first."""
        spec = fourier_spec(self.spec, fourier.settings(beta, self.cache))
        robust = self.paths.robust / self.robust["key"] if self.robust else None
        store = embed(self.cfg, self.cache, self.paths.features, self.acc, self.precision, self.transform, spec,
                      robust, (fourier, beta))
        return self._predictor(store, table, None)

    def save(self, run: RunDir, model: nn.Module) -> None:
        save_weights(run, model)

    def load(self, run: RunDir) -> nn.Module:
        return load_weights(run, self.build_model()).to(self.acc.device)

    def _inputs(self, source: pd.DataFrame) -> TableRows:
        """The table's rows (every stored view) in the head's input space, as training sees them: read a batch
        at a time, each center standardised by its own moments (from its stat views, in chunks) when
        model.feature_shift is standardize."""
        standard = None
        if self.cfg.model.feature_shift == "standardize":
            standard = {c: moments(self._tta_rows(group)) for c, group in source.groupby("center")}
        return TableRows(self.store, source, standard=standard, chunk_device=self.acc.device)

    def adapt(self, model: nn.Module, table: pd.DataFrame, source: pd.DataFrame) -> tuple[nn.Module, dict]:
        """The head adapted to one center from its unlabelled stored views: the feature shift re-estimated on
        them, then (model.self_train_rounds) self-training on its confident predictions beside the fold's
        labelled `source` rows. 'changed' counts the maps re-estimated and the rounds that trained (0 with
        neither: the head keeps no statistics of its inputs and does not self-train)."""
        m = self.cfg.model
        if m.feature_shift == "none" and not m.self_train_rounds:
            return model, {"changed": 0, "method": "none"}
        adapted = copy.deepcopy(self.acc.unwrap_model(model)).eval()
        target = self._tta_rows(table)
        steps = [f"feature shift {m.feature_shift}"] * (m.feature_shift != "none") + \
            [f"self-training x{m.self_train_rounds}"] * bool(m.self_train_rounds)
        record = {"changed": adapted.shift.adapt_to(target), "method": " + ".join(steps)}
        if m.self_train_rounds:
            with torch.no_grad():  # self-training holds the center (float16, through its re-estimated shift)
                target = torch.cat([adapted.shift(chunk.float()).half() for chunk in target.chunks()])
            labels = torch.tensor(source["label"].to_numpy(), device=self.acc.device)
            train = SelfTraining(m.self_train_rounds, m.self_train_threshold, self.cfg.optim.lr,
                                 self.cfg.train.batch_size, self.cfg.train.seed)
            record.update(train(adapted, self._inputs(source).tensor().to(self.acc.device), labels, target))
            record["changed"] += sum(n > 0 for n in record["self_training"]["pseudo_labelled"])  # rounds that trained
        return self.acc.prepare(adapted), record
