"""What every kind of model shares: the Task protocol that the engine, the infer stage and the report rely on, the
batch streams, and the weights file of a run.

A kind of model is one module of this package with a class that satisfies `Task` and registers itself in
TASKS under its `kind` (the config's `model.kind`); nothing else asks which kind a run is.

  lineage()                     what the task's data were computed from besides the cache (run inputs)
  stored_data()                 the data the task stores before training (a head's feature store, embedded
                                when missing: the `embed` stage); None for images
  build_model(source)           a new model to train (`source`: the fold's labelled rows, None to load one)
  streams(source, target, seed) the labelled and unlabelled batch streams; `.epoch(e)` gives an epoch's
  feed(src, tgt)                one step's inputs for the algorithm (x, y, domain, x_target, ..., images)
  to_model(x)                   augmented images/features -> what the model's forward takes
  predictor(table, views, desc) a callable model -> per-view logits table (id, center, label, v0..)
  fourier_predictor(table, fourier, beta, desc)  the same, the views each patch's Fourier transfers to its
                                nearest donors (infer --fourier; a head reads them from a store of the transfers)
  features(model, table)        the model's pooled features (n x D) of the table's patches, plain view (the
                                report's feature map)
  save(run, model), load(run)   the trained model to and from the run folder (safetensors, no pickle)
  adapt(model, table, source)   the model adapted to one center without its labels (`source`: the fold's
                                labelled rows, for self-training) and a record: layers/maps/rounds changed
                                (0: nothing to adapt, its predictions stay the plain ones), the method, details
"""
from __future__ import annotations

from typing import Callable, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config
from ..data.cache import Cache
from ..data.loader import TensorBatches
from ..lineage import StaleError
from ..runs import RunDir
from ..safeio import atomic


@runtime_checkable
class Task(Protocol):
    kind: ClassVar[str]
    cfg: Config
    domains: dict[int, int]

    def lineage(self) -> dict: ...
    def stored_data(self): ...
    def build_model(self, source: pd.DataFrame | None = None) -> nn.Module: ...
    def streams(self, source: pd.DataFrame, target: pd.DataFrame, seed: int) -> "Streams": ...
    def feed(self, src: dict, tgt: dict | None) -> dict: ...
    def to_model(self, x): ...
    def predictor(self, table: pd.DataFrame, views: int | None = None,
                  desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]: ...
    def fourier_predictor(self, table: pd.DataFrame, fourier, beta: float,
                          desc: str = "predict") -> Callable[[nn.Module], pd.DataFrame]: ...
    def features(self, model: nn.Module, table: pd.DataFrame) -> np.ndarray: ...
    def save(self, run: RunDir, model: nn.Module) -> None: ...
    def load(self, run: RunDir) -> nn.Module: ...
    def adapt(self, model: nn.Module, table: pd.DataFrame, source: pd.DataFrame) -> tuple[nn.Module, dict]: ...


TASKS: dict[str, type] = {}  # model.kind -> the Task class (each kind's module registers itself)


def register(cls: type) -> type:
    TASKS[cls.kind] = cls
    return cls


def domains_of(cache: Cache) -> dict[int, int]:
    """Center id -> domain index (the domain head's classes), the same for every run of a cache."""
    return {c: i for i, c in enumerate(sorted(cache.index["center"].unique()))}


class Streams:
    """Labelled and unlabelled batch streams whose order is a function of (seed, epoch)."""

    def __init__(self, make: Callable[[int], tuple]):
        self._make = make

    def epoch(self, epoch: int) -> tuple:
        return self._make(epoch)


def tensor_streams(task, tensor_of, source, target, seed: int, one_view: bool = False) -> Streams:
    """Whole-batch gathers from tensors (device or host memory, or rows read from disk): no per-item Python work.
    `one_view`: one random view of each row (N x V x ... inputs)."""
    acc, t = task.acc, task.cfg.train
    streams = [TensorBatches(tensor_of(table), table, task.domains, bs, acc.device, seed + k,
                             acc.process_index, acc.num_processes, one_view)
               for k, (table, bs) in enumerate([(source, t.batch_size), (target, t.target_batch_size)])]

    def epoch(e: int):
        for s in streams:
            s.set_epoch(e)
        return tuple(streams)
    return Streams(epoch)


def save_weights(run: RunDir, model: nn.Module) -> None:
    with atomic(run.checkpoint) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def load_weights(run: RunDir, model: nn.Module) -> nn.Module:
    """The run's trained weights into `model` (safetensors: nothing is unpickled)."""
    try:
        weights = load_file(str(run.checkpoint))
    except Exception as e:  # safetensors raises its own error type, without the path
        raise StaleError(
            f"{run.checkpoint}: cannot be read as safetensors ({e}); retrain the run (train --force)"
        ) from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise StaleError(f"{run.checkpoint}: does not fit the model of {run.config} ({first}); "
                         "retrain the run (train --force)") from None
    return model


