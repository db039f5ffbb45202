"""Stage `fm-standin`: small RANDOM-weight stand-ins of foundation models, to run the hub path offline."""
from __future__ import annotations

from pathlib import Path

from . import Stage

STAGE = Stage("write small RANDOM-weight stand-ins of foundation models, to run the hub path offline "
              "without the real weights", "nothing",
              "--out: a Hugging Face hub cache (point HF_HUB_CACHE at it) or, with --layout dir, "
              "a folder of the repo's files",
              flow="-> --out (a hub cache or folder)")


def arguments(p) -> None:
    p.add_argument("--recipe", default="all", help="recipe name(s), comma-separated, or 'all'")
    p.add_argument("--out", required=True, help="a Hugging Face hub cache folder (point HF_HUB_CACHE at it) or, with "
                                                "--layout dir, the folder for the repo's files")
    p.add_argument("--layout", choices=("cache", "dir"), default="cache",
                   help="cache: hub-cache layout (models--org--name/snapshots/...); dir: the repo's files in --out")


def run(a, paths) -> None:
    from ..models.foundation import RECIPES, resolve_recipe
    from ..models.foundation.standin import standin_overrides, write_standin

    names = list(RECIPES) if a.recipe == "all" else a.recipe.split(",")
    for name in names:
        recipe = resolve_recipe(name)
        folder = write_standin(recipe, Path(a.out), layout=a.layout)
        extra = standin_overrides(recipe)
        print(f"fm-standin: {recipe.title} stand-in (RANDOM weights, not the real model) in {folder}"
              + (f"; load it with model.recipe_overrides.create_kwargs={extra['create_kwargs']}" if extra else ""))
