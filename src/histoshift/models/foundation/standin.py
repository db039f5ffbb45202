"""Stand-ins: a recipe's model classes and token layout, 2 blocks wide 32, RANDOM weights, written
where the real model would be - a Hugging Face cache (models--org--name/snapshots/<rev>/, refs/main)
or a plain folder (a Kaggle-dataset-style copy) - with the repo's config.json structure.

They exist to run the foundation-model path end to end without the hub (tests, offline smoke runs):
the ordinary loading code reads them exactly as it reads the real download. Their config.json carries
`histoshift_standin: true`, and loading one prints a warning: their features mean nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .adapters import ADAPTERS, FIXED_SPEC
from .build import build_network, recipe_build
from .recipe import STANDIN_KEY
from .recipe import Recipe

WIDTH, DEPTH, HEADS = 32, 2, 2
SHRINK = {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS}
# a DaViT four stages deep, narrow, one block each; the card's window, patch convs and strides
DAVIT_SHRINK = {"depths": [1, 1, 1, 1], "embed_dims": [2, 4, 8, 16], "num_heads": [1, 1, 1, 2]}
PROJECTION = 16


def standin_overrides(recipe: Recipe) -> dict:
    """Recipe overrides a stand-in needs: only where the card passes the model's size at creation time
    (UNI2-h), since creation arguments win over the repo's config."""
    shrink = {k: v for k, v in SHRINK.items() if k in recipe.create_kwargs}
    return {"create_kwargs": shrink} if shrink else {}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every float tensor drawn at random (layer scales and norms included), so that tokens, registers
    and patch tokens really differ and an embedding rule can be checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _timm_standin(recipe: Recipe, folder: Path, seed: int) -> None:
    from safetensors.torch import save_file

    model_args = {**recipe.arch_kwargs, **SHRINK}
    side = model_args.get("img_size", recipe.input_size)
    build = {"library": "timm", "architecture": recipe.architecture,
             "kwargs": {**model_args, **recipe.create_kwargs, **SHRINK, "num_classes": 0}}
    net = build_network(build, recipe)
    _randomize(net, seed)
    config = {"architecture": recipe.architecture, "num_classes": 0, "num_features": WIDTH,
              "global_pool": model_args.get("global_pool", "token"), "model_args": model_args,
              "pretrained_cfg": {"input_size": [3, side, side],
                                 "interpolation": recipe.interpolation, "crop_pct": recipe.crop_pct,
                                 "mean": list(recipe.mean), "std": list(recipe.std), "num_classes": 0,
                                 "license": recipe.licence},
              STANDIN_KEY: True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


def _unicl_standin(recipe: Recipe, folder: Path, seed: int) -> None:
    """MedImageInsight's layout: <version>/config.yaml and <version>/vision_model/<file> holding safetensors
    content under its own key names (image tower, projection, and a text tower that is never read)."""
    import yaml
    from safetensors.torch import save_file

    adapter = ADAPTERS[recipe.adapter]
    build = {"library": "timm", "architecture": recipe.architecture,
             "kwargs": {**recipe.arch_kwargs, **DAVIT_SHRINK, "num_classes": 0}}
    net = build_network(build, recipe)
    _randomize(net, seed)
    g = torch.Generator().manual_seed(seed + 1)
    width = DAVIT_SHRINK["embed_dims"][-1]
    tensors = {adapter.hub_key(k): v.contiguous() for k, v in net.state_dict().items()}
    tensors.update({"image_projection": torch.randn(width, PROJECTION, generator=g),
                    "lang_projection": torch.randn(12, PROJECTION, generator=g), "logit_scale": torch.ones(()),
                    "lang_encoder.token_embedding.weight": torch.randn(10, 12, generator=g)})
    config = {
        "IMAGE_ENCODER": {
            "NAME": "davit_v1",
            "NUM_CLASSES": 0,
            "IMAGE_SIZE": [recipe.input_size] * 2,
            "IMAGE_MEAN": list(recipe.mean),
            "IMAGE_STD": list(recipe.std),
            "SPEC": {
                **FIXED_SPEC,
                "DIM_EMBED": DAVIT_SHRINK["embed_dims"],
                "NUM_HEADS": DAVIT_SHRINK["num_heads"],
                "NUM_GROUPS": DAVIT_SHRINK["num_heads"],
                "DEPTHS": DAVIT_SHRINK["depths"],
                "WINDOW_SIZE": recipe.arch_kwargs["window_size"],
            },
        },
        "UNICL_MODEL": {"DIM_PROJECTION": PROJECTION},
        "AUG": {"INTERPOLATION": recipe.interpolation},
        "TEST": {"CENTER_CROP": False},
        STANDIN_KEY: True,
    }
    (folder / recipe.config_file).parent.mkdir(parents=True, exist_ok=True)
    (folder / recipe.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / recipe.weights_file).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / recipe.weights_file))  # safetensors content under the repo's `.pt` name


def _transformers_standin(recipe: Recipe, folder: Path, seed: int) -> None:
    build = recipe_build(recipe)
    config = {**build["config"], "hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS}
    if "intermediate_size" in config:
        config["intermediate_size"] = 4 * WIDTH
    net = build_network({**build, "config": config}, recipe)
    _randomize(net, seed)
    net.save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, **recipe.hub_config, STANDIN_KEY: True}, indent=2))


def write_standin(recipe: Recipe, out: Path, layout: str = "cache", seed: int = 0) -> Path:
    """Write a stand-in of `recipe` under `out`: layout "cache" (a Hugging Face hub cache, as HF_HUB_CACHE
    points to) or "dir" (the repo's files in `out` itself). Returns the folder holding config.json."""
    out = Path(out)
    if layout == "cache":
        repo = out / f"models--{recipe.hub_id.replace('/', '--')}"
        revision = hashlib.sha1(f"histoshift-standin-{recipe.name}-{seed}".encode()).hexdigest()
        folder = repo / "snapshots" / revision
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    elif layout == "dir":
        folder = out
    else:
        raise ValueError(f"layout: 'cache' or 'dir', got '{layout}'")
    folder.mkdir(parents=True, exist_ok=True)
    write = _unicl_standin if recipe.adapter else _timm_standin if recipe.library == "timm" else _transformers_standin
    write(recipe, folder, seed)
    if layout == "cache":
        _as_blobs(repo, folder)
    return folder


def _as_blobs(repo: Path, folder: Path) -> None:
    """The hub cache's own layout: each file's bytes in blobs/<its hash> and the snapshot a folder of relative
    links to them. Large (LFS) files are named by their SHA-256, small ones by their git blob hash (SHA-1)."""
    from .hub import WEIGHT_SUFFIXES

    blobs = repo / "blobs"
    blobs.mkdir(exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        name = (hashlib.sha256(data).hexdigest() if path.suffix in WEIGHT_SUFFIXES
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (blobs / name).write_bytes(data)
        path.unlink()
        path.symlink_to(Path(*[".."] * len(path.relative_to(repo).parts[:-1])) / "blobs" / name)
