"""The kinds of model behind one protocol (base.py: `Task`): what the training engine, the infer stage and the
report need of a model, whatever it learns from.

  image    image.py    fine-tunes a backbone (timm or a foundation recipe) on images from the cache
  feature  feature.py  trains a small head on features a fixed backbone stored once (the `embed` stage)

The config's `model.kind` chooses the class (`make_task`), the run records it, `run_task` rebuilds it. A third
kind is a new module with a registered class, a line in KINDS (and its config class in config/model.py).
"""
from __future__ import annotations

from importlib import import_module

from accelerate import Accelerator
from torch import nn

from ..config import Config
from ..data.cache import Cache
from ..models.foundation.checked import load_experiment
from ..paths import Paths
from ..precision import config_precision
from ..runs import RunDir
from .base import TASKS, Task

# model.kind -> its module, imported when a task of that kind is made: a head on stored features never imports
# timm and torchvision (2.6 s of every stage process on 2 cores)
KINDS = {"image": "image", "feature": "feature"}
_LAZY = {"FeatureTask": "feature", "ImageTask": "image", "adapt_batchnorm": "image"}


def task_class(kind: str) -> type:
    """The Task class registered for `kind` (its module imported on first use; it registers itself)."""
    if kind not in TASKS:
        import_module(f".{KINDS[kind]}", __name__)
    return TASKS[kind]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_task(cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator) -> Task:
    """The task of the config's kind (`model.kind`)."""
    return task_class(cfg.model.kind)(cfg, cache, paths, accelerator, config_precision(cfg))


def run_task(run: RunDir, cache: Cache, paths: Paths, accelerator: Accelerator) -> tuple[Task, nn.Module]:
    """A finished run's task (the kind it recorded) and its trained model, checked against the current
    cache and, for heads on features, the current feature store."""
    run.check_inputs(cache.digests)
    task = task_class(run.kind)(run.cfg, cache, paths, accelerator, config_precision(run.cfg))
    run.check_lineage(task.lineage())  # before anything is embedded: a run of other data is refused at once
    if task.stored_data() is not None:  # the store verified, damaged chunks embedded again: compare what it
        run.check_lineage(task.lineage())  # holds now (re-embedded bytes that differ make the run stale)
    return task, task.load(run)


__all__ = ["FeatureTask", "ImageTask", "KINDS", "TASKS", "Task", "adapt_batchnorm", "load_experiment", "make_task",
           "run_task", "task_class"]
