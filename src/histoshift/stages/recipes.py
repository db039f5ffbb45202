"""Stage `recipes`: the foundation-model registry as a table (the README's is generated from it)."""
from __future__ import annotations

from . import Stage

STAGE = Stage("list the foundation-model recipes (hub id, embedding, input, mean/std, precision, licence)",
              "nothing", "nothing (prints a markdown table)", flow="-> (prints the recipe table)")


def arguments(p) -> None:
    pass


def run(a, paths) -> None:
    from ..models.foundation import RECIPES

    print("| recipe | model | hub id | library | embedding | dim | input | mean / std | precision | gated | licence |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RECIPES.values():
        crop = f", crop {r.crop_pct}" if r.crop_pct < 1 else ""
        library = f"{r.library} + `{r.adapter}` adapter" if r.adapter else r.library
        print(f"| `{r.name}` | [{r.title}]({r.card}) | `{r.hub_id}` | {library} | {r.embedding} | {r.embed_dim} | "
              f"{r.input_size} {r.interpolation}{crop} | {r.mean} / {r.std} | {r.precision} | "
              f"{'yes' if r.gated else 'no'} | {r.licence} |")
