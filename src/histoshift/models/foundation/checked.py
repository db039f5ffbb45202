"""A config read and checked against the registries too (the foundation recipe and its overrides): what every
stage reads a --config with. Imports no torch, so that a stage with nothing to do (`stain-gan` without
`aug.stain_norm: gan`, `embed` of a fine-tuned config) says so in a fraction of a second."""
from __future__ import annotations

from ...config import Config, ConfigError, load_config
from . import RecipeError, resolve_recipe


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
