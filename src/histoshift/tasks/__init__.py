"""The kinds of model behind one protocol (base.py: `Task`): what the training engine, the infer stage and the
report need of a model, whatever it learns from.

  image    image.py    fine-tunes a backbone (timm or a foundation recipe) on images from the cache
  feature  feature.py  trains a small head on features a fixed backbone stored once (the `embed` stage)

The config's `model.kind` chooses the class (`make_task`), the run records it, `run_task` rebuilds it. A third
kind is a new module with a registered class (and its config class in config/model.py).
"""
from __future__ import annotations

from accelerate import Accelerator
from torch import nn

from ..config import Config, ConfigError, load_config
from ..data.cache import Cache
from ..models.foundation import RecipeError, resolve_recipe
from ..paths import Paths
from ..precision import config_precision
from ..runs import RunDir
from . import feature, image  # noqa: F401 - each registers its kind
from .base import TASKS, Task
from .feature import FeatureTask
from .image import ImageTask, adapt_batchnorm


def load_experiment(path, overrides=()) -> Config:
    """A config checked against the registries too (the foundation recipe and its overrides)."""
    cfg = load_config(path, overrides)
    if cfg.model.recipe:
        try:
            recipe = resolve_recipe(cfg.model.recipe, cfg.model.recipe_overrides)
        except RecipeError as e:
            raise ConfigError(f"model.recipe: {e}") from None
        changed = {"library", "architecture"} & set(cfg.model.recipe_overrides)
        if changed and not _library_has(recipe.library, recipe.architecture):
            raise ConfigError(f"model.recipe_overrides.{sorted(changed)[0]}: {recipe.library} has no model "
                              f"'{recipe.architecture}' (the recipe {cfg.model.recipe} builds "
                              f"{resolve_recipe(cfg.model.recipe).architecture} with "
                              f"{resolve_recipe(cfg.model.recipe).library})")
    return cfg


def _library_has(library: str, architecture: str) -> bool:
    """Whether timm can create, or transformers has a class named, `architecture` (an overridden recipe)."""
    if library == "timm":
        import timm

        return timm.is_model(architecture)
    try:
        import transformers
    except ImportError:
        return True  # said by the loader in one line, with how to install it
    return hasattr(transformers, architecture)


def make_task(cfg: Config, cache: Cache, paths: Paths, accelerator: Accelerator) -> Task:
    """The task of the config's kind (`model.kind`)."""
    return TASKS[cfg.model.kind](cfg, cache, paths, accelerator, config_precision(cfg))


def run_task(run: RunDir, cache: Cache, paths: Paths, accelerator: Accelerator) -> tuple[Task, nn.Module]:
    """A finished run's task (the kind it recorded) and its trained model, checked against the current
    cache and, for heads on features, the current feature store."""
    run.check_inputs(cache.digests)
    task = TASKS[run.kind](run.cfg, cache, paths, accelerator, config_precision(run.cfg))
    run.check_lineage(task.lineage())  # before anything is embedded: a run of other data is refused at once
    if task.stored_data() is not None:  # the store verified, damaged chunks embedded again: compare what it
        run.check_lineage(task.lineage())  # holds now (re-embedded bytes that differ make the run stale)
    return task, task.load(run)


__all__ = ["FeatureTask", "ImageTask", "TASKS", "Task", "adapt_batchnorm", "load_experiment", "make_task", "run_task"]
