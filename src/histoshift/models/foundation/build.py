"""Building a recipe's network: from the recipe alone, from a `build` record (a finished run's), or from a weight
source (the card's own call: timm's hf-hub:/local-dir: sources, or the card's transformers class itself, never
AutoModel and never code from the hub); the input-size and downloaded-constants checks."""
from __future__ import annotations

import torch
from torch import nn

from ...records import WeightSource
from ..weights import WeightsError, check_weights_file, load_into, read_state_dict
from .adapters import ADAPTERS
from .hub import from_the_hub, hub_error, local_weights_file, preprocessor_config, repo_path
from .recipe import Recipe, RecipeError

# tensors a card's inference never uses, allowed to be absent from (or left over in) a transformers repo
UNUSED_MISSING = ("embeddings.mask_token",)  # DINOv2's masked-image-modelling token


def resolve_layer(key: str, value):
    """'torch.nn.SiLU' -> the class, for creation arguments such as act_layer / mlp_layer."""
    import importlib

    if not (key.endswith("_layer") and isinstance(value, str) and value.startswith(("torch.", "timm."))):
        return value
    module_name, _, attr = value.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise WeightsError(f"{key}: cannot import {value}") from None


def _transformers(recipe: Recipe):
    try:
        import transformers
    except ImportError:
        raise WeightsError(f"{recipe.title} is a transformers model: the optional package `transformers` is not "
                           "installed (pip install transformers; tested with 5.23.0)") from None
    return transformers























def timm_build(recipe: Recipe, repo_config: dict) -> dict:
    """timm architecture + kwargs of the model a source holds: the repo's config.json (its model_args,
    and the side its positional embedding was saved at) or, without one, the recipe's. An adapter
    recipe keeps its architecture, sized by the repo's config, and records the projection width."""
    if recipe.adapter:
        kwargs = {
            **recipe.arch_kwargs,
            **(repo_config.get("model_args") or {}),
            **recipe.create_kwargs,
            "num_classes": 0,
        }
        projection = repo_config.get("projection_dim", ADAPTERS[recipe.adapter].projection_dim)
        return {"library": "timm", "architecture": recipe.architecture, "kwargs": kwargs, "projection_dim": projection}
    if repo_config:
        kwargs = dict(repo_config.get("model_args") or {})
        size = (repo_config.get("pretrained_cfg") or {}).get("input_size")
        if size and "img_size" not in kwargs:
            kwargs["img_size"] = size[-1]
        arch = repo_config["architecture"]
    else:
        kwargs, arch = dict(recipe.arch_kwargs), recipe.architecture
    kwargs.update(recipe.create_kwargs)
    kwargs["num_classes"] = 0
    return {"library": "timm", "architecture": arch, "kwargs": kwargs}


def build_network(build: dict, recipe: Recipe) -> nn.Module:
    """The network a `build` record describes, random weights (also on the meta device)."""
    if build["library"] == "timm":
        import timm

        kwargs = {k: resolve_layer(k, v) for k, v in build["kwargs"].items()}
        return timm.create_model(build["architecture"], pretrained=False, **kwargs)
    transformers = _transformers(recipe)
    # the backbone-API fields are derived from the depth: left out, they follow a changed depth
    config = {
        k: v for k, v in build["config"].items() if k.lstrip("_") not in ("out_features", "out_indices", "stage_names")
    }
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    return getattr(transformers, build["architecture"])(config, **recipe.create_kwargs)


def recipe_build(recipe: Recipe) -> dict:
    """The full-size architecture from the recipe alone (no hub, no files)."""
    if recipe.library == "timm":
        return timm_build(recipe, {})
    transformers = _transformers(recipe)
    cls = getattr(transformers, recipe.architecture)
    config = cls.config_class(**recipe.arch_kwargs).to_dict()
    return {"library": "transformers", "architecture": recipe.architecture, "config": config}


def _adapted_state(recipe: Recipe, weights: WeightSource) -> tuple[dict, torch.Tensor]:
    """An adapter recipe's weights file (hub cache, a copy's own layout, or the file alone), its image
    tower renamed onto the timm network: (network state dict, projection)."""
    adapter = ADAPTERS[recipe.adapter]
    if weights.kind == "file":
        path = weights.path
    else:
        path = repo_path(recipe, weights, recipe.weights_file)
    return adapter.convert(read_state_dict(path, keep=adapter.keep), str(path))


def _transformers_load(recipe: Recipe, where: str) -> nn.Module:
    """The card's transformers class itself (never AutoModel: a repo's auto_map names code from the hub,
    and a native class of another model_type would load with silently missing weights), loaded strictly:
    a missing, left-over or misshaped tensor stops with one line."""
    transformers = _transformers(recipe)
    net, info = getattr(transformers, recipe.architecture).from_pretrained(where, output_loading_info=True,
                                                                           **recipe.create_kwargs)
    skipped = ("pooler.",) if recipe.create_kwargs.get("add_pooling_layer") is False else ()
    problems = {
        "missing from the weights": [k for k in info.get("missing_keys", ()) if k not in UNUSED_MISSING],
        "not in the model": [k for k in info.get("unexpected_keys", ()) if not k.startswith(skipped)],
        "of another shape": [
            str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys", ())
        ],
    }
    for what, keys in problems.items():
        if keys:
            raise WeightsError(f"{where}: {len(keys)} tensors {what} for a {recipe.architecture} as the {recipe.title} "
                               f"card builds it, e.g. {sorted(keys)[:3]}: not the weights this recipe expects")
    return net


def load_network(recipe: Recipe, weights: WeightSource, repo_config: dict) -> tuple[nn.Module, dict, dict | None]:
    """(network, build record, state to load strictly into the whole backbone or None)."""
    if weights.kind == "file" and recipe.library == "transformers":
        raise WeightsError(f"{recipe.title} is a transformers model: point model.weights at a copy of the repo "
                           f"(dir:PATH holding config.json and the weights), not at a weights file")
    if recipe.adapter:  # another codebase's files: our architecture, the adapter's renaming, strict loading
        build = timm_build(recipe, repo_config)
        if weights.kind == "none":
            return build_network(build, recipe), build, None
        encoder, projection = _adapted_state(recipe, weights)
        build["projection_dim"] = projection.shape[1]
        state = {**{f"net.{k}": v for k, v in encoder.items()}, "projection": projection}
        return build_network(build, recipe), build, state
    if weights.kind in ("none", "file"):
        build = recipe_build(recipe)
        net = build_network(build, recipe)
        if weights.kind == "file":
            path = weights.path
            load_into(net, read_state_dict(path), str(path))
        return net, build, None
    where = recipe.hub_id if weights.kind == "hub" else str(weights.path)
    held = local_weights_file(recipe, weights)
    if held is not None:  # a truncated or damaged download is named before a library blames another file
        check_weights_file(held)
    try:
        if recipe.library == "timm":
            import timm

            build = timm_build(recipe, repo_config)
            prefix = "hf-hub:" if weights.kind == "hub" else "local-dir:"  # timm's source names
            kwargs = {k: resolve_layer(k, v) for k, v in recipe.create_kwargs.items()}
            net = timm.create_model(prefix + where, pretrained=True, num_classes=0, **kwargs)
        else:
            net = _transformers_load(recipe, where)
            build = {"library": "transformers", "architecture": recipe.architecture, "config": net.config.to_dict()}
    except (WeightsError, RecipeError):
        raise
    except Exception as e:  # noqa: BLE001 - hub and file failures become one line
        if weights.kind == "hub" and from_the_hub(e):
            raise hub_error(recipe.hub_id, e) from e
        text = str(e).splitlines()[0] if str(e) else ""
        config = repo_path(recipe, weights, recipe.config_file)  # present: _repo_config read it
        fix = f"`hf download {recipe.hub_id} --force-download`" if weights.kind == "hub" else "a fresh copy of the repo"
        raise WeightsError(
            f"{config}: {recipe.title} cannot be built or loaded from the network this file describes "
            f"({type(e).__name__}: {text}); an edited or foreign file? restore the repo's own ({fix})"
        ) from e
    return net, build, None





def check_input_size(recipe: Recipe, net: nn.Module) -> None:
    """A fixed-size ViT patch embedding takes only the size it was built for; any takes multiples of its patch."""
    embed = getattr(net, "patch_embed", None)
    img, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if img is None or patch is None:
        return
    size = recipe.input_size
    if getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_pad", False) \
            and tuple(img) != (size, size):
        raise RecipeError(f"model.recipe_overrides.input_size={size}: {recipe.title}'s network takes {img[0]}x{img[1]} "
                          f"inputs (a fixed-size patch embedding); use {img[0]}, or add dynamic_img_size: true to "
                          "the recipe's create_kwargs")
    if size % patch[0]:
        raise RecipeError(f"model.recipe_overrides.input_size={size}: not a multiple of {recipe.title}'s patch size "
                          f"{patch[0]}")





def downloaded_constants(recipe: Recipe, weights: WeightSource, repo_config: dict) -> dict:
    """mean / std / interpolation as the downloaded files state them (timm's pretrained_cfg in
    config.json, transformers' preprocessor_config.json); missing entries are left out."""
    if recipe.library == "timm":
        pcfg = repo_config.get("pretrained_cfg") or {}
        return {k: pcfg[k] for k in ("mean", "std", "interpolation") if k in pcfg}
    proc = preprocessor_config(recipe, weights)
    out = {"mean": proc.get("image_mean"), "std": proc.get("image_std"),
           "interpolation": {2: "bilinear", 3: "bicubic"}.get(proc.get("resample"))}
    return {k: v for k, v in out.items() if v is not None}


def check_config_constants(recipe: Recipe, weights: WeightSource, repo_config: dict) -> None:
    """Say so when the downloaded files carry other constants than the card's (the recipe wins)."""
    for key, theirs in downloaded_constants(recipe, weights, repo_config).items():
        ours = getattr(recipe, key)
        differs = theirs != ours if isinstance(theirs, str) else any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours))
        if differs:
            print(f"note: {recipe.hub_id}'s downloaded config says {key} {theirs}; the recipe uses {ours} "
                  f"(override with model.recipe_overrides.{key} if the card says otherwise)")
