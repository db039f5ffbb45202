"""Pathology foundation models, one recipe per model card, one module per vendor.

RECIPES is the only list of supported models: tests walk it (every entry builds at full size on the
meta device, loads a stand-in from a Hugging Face cache offline, and embeds by its card's rule).
"""
from __future__ import annotations

from . import bioptimus, gigapath, histai, kaiko, mahmood, meta, microsoft, owkin, paige
from .recipe import Recipe, RecipeError, override

RECIPES: dict[str, Recipe] = {r.name: r for module in (bioptimus, paige, microsoft, kaiko, histai, mahmood, owkin,
                                                            gigapath, meta)
                              for r in module.RECIPES}


def resolve_recipe(name: str, overrides: dict | None = None) -> Recipe:
    """The named recipe with a config's overrides applied."""
    if name not in RECIPES:
        raise RecipeError(f"unknown foundation model '{name}' (known: {', '.join(RECIPES)})")
    return override(RECIPES[name], overrides or {})
