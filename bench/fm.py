"""Foundation-model embedding speed: per recipe, the full architecture with random weights, the
repository's embedding path (uint8 patches in host memory -> device -> 8 dihedral views -> the card's
resize and normalisation -> one forward under the recipe's precision -> float16 on the host) against
the model-only ceiling (the same forward on a ready, normalised tensor) measured in the same run, the
peak GPU memory at the chosen batch, and the projected wall time for the competition
(219,958 patches x 8 views).

    python bench/fm.py                               # every recipe, on the GPU if there is one
    python bench/fm.py --recipes hoptimus0,virchow2 --patches 2048
    python bench/fm.py --device cpu --depth 1 --patches 8   # a tiny CPU run: the path works, numbers are not GPU's

Also prints each model's forward FLOPs per image (counted on the meta device) and, for rows measured
on CPU, an H100 estimate from them at an assumed 40% of its dense bf16 peak: an estimate, not a
measurement. Results go to bench/results/fm-<date>-<device>.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from histoshift.config import Config, FeatureModelCfg  # noqa: E402
from histoshift.features.embedder import Embedder  # noqa: E402
from histoshift.stain.transform import InputTransform  # noqa: E402
from histoshift.models.foundation import RECIPES, resolve_recipe  # noqa: E402
from histoshift.models.foundation.build import build_network, recipe_build  # noqa: E402
from histoshift.models.foundation.loader import FoundationBackbone  # noqa: E402
from histoshift.precision import autocast, resolve_precision  # noqa: E402
from histoshift.preflight_checks import forward_flops  # noqa: E402

COMPETITION_IMAGES = 219_958 * 8
H100_BF16_DENSE_FLOPS = 989e12
ASSUMED_UTILISATION = 0.4


def shallow(recipe, depth: int | None):
    """The recipe with fewer blocks (tiny CPU runs); None: the card's depth."""
    if not depth:
        return recipe
    if recipe.library == "transformers":
        return resolve_recipe(recipe.name, {"arch_kwargs": {"num_hidden_layers": depth}})
    if "depths" in recipe.arch_kwargs:  # a DaViT: `depth` blocks in its deep stage, one in the others
        return resolve_recipe(recipe.name, {"arch_kwargs": {"depths": [1, 1, depth, 1]}})
    where = "create_kwargs" if "depth" in recipe.create_kwargs else "arch_kwargs"
    return resolve_recipe(recipe.name, {where: {"depth": depth}})


def flops_per_image(recipe) -> float:
    with torch.device("meta"):
        build = recipe_build(recipe)
        net = FoundationBackbone(recipe, build_network(build, recipe), build, check_dim=False)
    return forward_flops(net, recipe.input_size)


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernels, autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def ceiling_inputs(images: int, side: int, device: torch.device, precision: str) -> torch.Tensor:
    """The model-only pass's inputs, at most the fitted batch: allocated after the path's memory was given back, in
    the dtype autocast feeds the network, and halved on out-of-memory (the Embedder sized its batch to 85% of the
    free memory; a float32 copy of 2,048 images at 480 px is 5.7 GB on top)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    while True:
        try:
            return torch.randn(images, 3, side, side, device=device, dtype=dtype)
        except torch.OutOfMemoryError:
            if images <= 8:
                raise
            images //= 2
            torch.cuda.empty_cache()


def bench_recipe(
    name: str, device: torch.device, depth: int | None, patches: int, repeats: int, views: int = 8
) -> dict:
    recipe = shallow(RECIPES[name], depth)
    precision = resolve_precision("auto", preferred=recipe.precision) if device.type == "cuda" else "no"
    build = recipe_build(recipe)
    backbone = FoundationBackbone(recipe, build_network(build, recipe), build, check_dim=False).eval().to(device)
    cfg = Config(model=FeatureModelCfg(recipe=name, feature_views=views))  # the embed stage's (8 views), no HED views
    embedder = Embedder(backbone, backbone.preprocess, cfg, InputTransform(cfg.aug), device, precision)
    images = np.random.default_rng(0).integers(0, 256, (patches, 96, 96, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    embedder(images[: max(2, min(patches, 64))], views, 0)  # fits the batch (GPU) and warms up
    batch = embedder.batch
    path_s = timed(lambda: embedder(images, views, 0), device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ready = ceiling_inputs(min(batch, patches) * views, recipe.input_size, device, precision)

    @torch.no_grad()
    def model_only():
        with autocast(device, precision):
            for _ in range(max(1, patches // min(batch, patches))):
                backbone(ready)

    model_s = timed(model_only, device, repeats)
    model_images = max(1, patches // min(batch, patches)) * len(ready)
    path_rate, ceiling = patches * views / path_s, model_images / model_s
    flops = flops_per_image(RECIPES[name])
    row = {
        "recipe": name,
        "title": recipe.title,
        "device": str(device),
        "depth": depth or "card",
        "precision": precision,
        "batch_patches": batch,
        "images_per_forward": batch * views,
        "views": views,
        "path_images_per_s": round(path_rate, 1),
        "ceiling_images_per_s": round(ceiling, 1),
        "path_vs_ceiling": round(path_rate / ceiling, 3),
        "peak_gib": None if peak is None else round(peak, 2),
        "gflops_per_image": round(flops / 1e9, 1),
        "competition_hours": round(COMPETITION_IMAGES / path_rate / 3600, 2) if not depth else None,
        "h100_estimate_hours": round(
            COMPETITION_IMAGES * flops / (H100_BF16_DENSE_FLOPS * ASSUMED_UTILISATION) / 3600, 2
        ),
    }
    del backbone, embedder, ready
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=None, help="blocks per model (tiny CPU runs); default: the card's")
    p.add_argument("--patches", type=int, default=None, help="patches per timed pass (default 2048 GPU / 8 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--views", type=int, default=8, help="views per patch (the embed stage: 8; fewer for a smoke run)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    patches = a.patches or (2048 if device.type == "cuda" else 8)
    names = list(RECIPES) if a.recipes == "all" else a.recipes.split(",")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'} x {torch.get_num_threads()} threads"
    )
    rows = []
    print(
        "| model | precision | batch (patches x 8) | path img/s | ceiling img/s | path/ceiling | peak GiB | GFLOP/img "
        "| "
        "competition x 8 views (h) | H100 estimate (h) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        row = bench_recipe(name, device, a.depth, patches, a.repeats, a.views)
        rows.append(row)
        print(
            f"| {row['title']} | {row['precision']} | {row['batch_patches']} | {row['path_images_per_s']:,} | "
            f"{row['ceiling_images_per_s']:,} | {row['path_vs_ceiling']:.2f} | {row['peak_gib'] or '-'} | "
            f"{row['gflops_per_image']} | {row['competition_hours'] or '-'} | {row['h100_estimate_hours']} |",
            flush=True,
        )
    out = Path(a.out or Path(__file__).parent / "results" / f"fm-{time.strftime('%Y-%m-%d')}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "depth": a.depth or "card",
                               "patches": patches, "rows": rows}, indent=2))
    print(f"machine: {machine}; written {out}")


if __name__ == "__main__":
    main()
