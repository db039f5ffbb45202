"""Build a recipe's backbone from its weight source, and embed by the card's rule.

Weight sources (`model.weights` with a recipe):
  hub        the Hugging Face hub through its local cache: the card's own call (timm.create_model("hf-hub:ID",
             pretrained=True, **card kwargs) or transformers.AutoModel.from_pretrained(ID)); with
             HF_HUB_OFFLINE=1 it reads a pre-downloaded cache (HF_HUB_CACHE / HF_HOME) and never the network
  dir:PATH   a downloaded copy of the hub repo (config.json + weights, e.g. a Kaggle dataset): timm's
             "local-dir:" source or transformers' from_pretrained(PATH)
  file:PATH  a weights file alone: the architecture is built from the recipe, the weights loaded strictly
  none       the recipe's architecture with random weights (benchmarks, tests; never a pretrained model)
A recipe with an `adapter` (MedImageInsight: another codebase's files on the hub) reads the repo's
`config_file` for the architecture and `weights_file` for the weights, renamed by the adapter
(adapters.py) and loaded strictly, whatever the source. transformers recipes are built from the card's
class itself, never AutoModel, and never with code from the hub.

Whatever the source, normalisation, input side, resize rule and embedding rule come from the recipe.
What was built is recorded (`build`), so a finished run rebuilds its backbone without the hub.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import Preprocess
from ..weights import WeightsError, load_into, read_state_dict
from .adapters import ADAPTERS
from .recipe import STANDIN_KEY, Recipe, RecipeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
CONFIG_SUFFIXES = (".json", ".yaml")
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


def hub_error(repo: str, e: Exception) -> WeightsError:
    """One clear line for the ways the hub can fail: offline or unreachable, gated, missing."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"https://huggingface.co/{repo}"
    text = str(e).split("\n")[0]
    if isinstance(e, GatedRepoError) or "gated" in str(e).lower():
        return WeightsError(f"{repo} is gated: accept its licence at {page} while logged in, then set HF_TOKEN "
                            f"(or run `hf auth login`) with that account's token ({text})")
    if isinstance(e, RepositoryNotFoundError):
        return WeightsError(f"{repo}: not found on the hub, or gated and no valid token was sent: accept the licence at "
                            f"{page} and set HF_TOKEN ({text})")
    if isinstance(e, LocalEntryNotFoundError) or "offline" in str(e).lower() or "connect" in str(e).lower():
        return WeightsError(f"{repo}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be "
                            f"reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): download it once with "
                            f"`hf download {repo}`, or point model.weights at a local copy (dir:PATH, file:PATH)")
    return WeightsError(f"{repo}: the Hugging Face hub failed: {type(e).__name__}: {text}")


def hub_file(repo: str, filename: str) -> Path:
    """A file of a hub repo through the local cache (downloaded when online and missing)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise hub_error(repo, e) from e


def source_identity(recipe: Recipe, weights: str) -> dict:
    """What identifies the weights without loading them: the hub snapshot's commit, or a local copy's
    files (path, size, modification time). Part of the feature-store key."""
    if weights == "hub":
        config = hub_file(recipe.hub_id, recipe.config_file)
        snapshot = config.parents[len(Path(recipe.config_file).parts) - 1]  # snapshots/<revision>
        return {"hub": recipe.hub_id, "revision": snapshot.name}
    if weights == "none":
        return {"random_init": True}
    path = Path(weights.split(":", 1)[1]).expanduser().resolve()
    if not path.exists():
        raise WeightsError(f"model.weights: {path} does not exist")
    return local_identity(path)


def snapshot_files(recipe: Recipe) -> dict:
    """The content identity of a hub snapshot's weight and config files as they are in the local cache now:
    per file its blob name (the hub cache names blobs by their content hash), size and modification time,
    and for config files a hash of their text. The feature store records it when it is embedded and
    compares it when reused: a file replaced or edited in the cache under the same revision is caught."""
    config = hub_file(recipe.hub_id, recipe.config_file)
    snapshot = config.parents[len(Path(recipe.config_file).parts) - 1]
    out = {}
    for p in sorted(snapshot.rglob("*")):
        if p.suffix not in WEIGHT_SUFFIXES + CONFIG_SUFFIXES or not p.is_file():
            continue
        real = p.resolve()
        st = real.stat()
        entry = [real.name if p.is_symlink() else None, st.st_size, st.st_mtime_ns]
        if p.suffix in CONFIG_SUFFIXES:
            entry.append(hashlib.sha256(real.read_bytes()).hexdigest()[:16])
        out[p.relative_to(snapshot).as_posix()] = entry
    return out


def local_identity(path: Path) -> dict:
    """A weights file, or a folder's weight and config files (subfolders included: MedImageInsight keeps
    them in 2024.09.27/...): path, and each file's relative name, size, mtime."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + CONFIG_SUFFIXES)
    else:
        files = [path]
    root = path if path.is_dir() else path.parent
    return {"path": str(path), "files": [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                         for p in files]}


def repo_path(recipe: Recipe, weights: str, name: str) -> Path:
    """A file of the recipe's repo: through the hub cache (`hub`) or inside a local copy (`dir:PATH`)."""
    if weights == "hub":
        return hub_file(recipe.hub_id, name)
    path = Path(weights.removeprefix("dir:")).expanduser() / name
    if not path.is_file():
        raise WeightsError(f"model.weights={weights}: no {name} there (expected a copy of the hub repo "
                           f"{recipe.hub_id} in its own layout)")
    return path


def _repo_config(recipe: Recipe, weights: str) -> dict:
    """The repo's architecture file (config.json, or what the recipe's adapter reads, e.g. MedImageInsight's
    config.yaml) from the hub cache or a local folder; {} for a bare weights file or random init."""
    if weights != "hub" and not weights.startswith("dir:"):
        return {}
    path = repo_path(recipe, weights, recipe.config_file)
    if recipe.adapter:
        return ADAPTERS[recipe.adapter].read_config(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot be read as the repo's config ({type(e).__name__}: {e})") from None


def timm_build(recipe: Recipe, repo_config: dict) -> dict:
    """timm architecture + kwargs of the model a source holds: the repo's config.json (its model_args,
    and the side its positional embedding was saved at) or, without one, the recipe's. An adapter
    recipe keeps its architecture, sized by the repo's config, and records the projection width."""
    if recipe.adapter:
        kwargs = {**recipe.arch_kwargs, **(repo_config.get("model_args") or {}), **recipe.create_kwargs, "num_classes": 0}
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
    config = {k: v for k, v in build["config"].items() if k.lstrip("_") not in ("out_features", "out_indices", "stage_names")}
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


def _adapted_state(recipe: Recipe, weights: str) -> tuple[dict, torch.Tensor]:
    """An adapter recipe's weights file (hub cache, a copy's own layout, or the file alone), its image
    tower renamed onto the timm network: (network state dict, projection)."""
    adapter = ADAPTERS[recipe.adapter]
    if weights.startswith("file:"):
        path = Path(weights.removeprefix("file:")).expanduser()
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
        "of another shape": [str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys", ())],
    }
    for what, keys in problems.items():
        if keys:
            raise WeightsError(f"{where}: {len(keys)} tensors {what} for a {recipe.architecture} as the {recipe.title} "
                               f"card builds it, e.g. {sorted(keys)[:3]}: not the weights this recipe expects")
    return net


def _load(recipe: Recipe, weights: str, repo_config: dict) -> tuple[nn.Module, dict, dict | None]:
    """(network, build record, state to load strictly into the whole backbone or None)."""
    if weights.startswith("file:") and recipe.library == "transformers":
        raise WeightsError(f"{recipe.title} is a transformers model: point model.weights at a copy of the repo "
                           f"(dir:PATH holding config.json and the weights), not at a weights file")
    if recipe.adapter:  # another codebase's files: our architecture, the adapter's renaming, strict loading
        build = timm_build(recipe, repo_config)
        if weights == "none":
            return build_network(build, recipe), build, None
        encoder, projection = _adapted_state(recipe, weights)
        build["projection_dim"] = projection.shape[1]
        state = {**{f"net.{k}": v for k, v in encoder.items()}, "projection": projection}
        return build_network(build, recipe), build, state
    if weights in ("none",) or weights.startswith("file:"):
        build = recipe_build(recipe)
        net = build_network(build, recipe)
        if weights.startswith("file:"):
            path = Path(weights.removeprefix("file:")).expanduser()
            load_into(net, read_state_dict(path), str(path))
        return net, build, None
    where = recipe.hub_id if weights == "hub" else str(Path(weights.removeprefix("dir:")).expanduser())
    try:
        if recipe.library == "timm":
            import timm

            build = timm_build(recipe, repo_config)
            prefix = "hf-hub:" if weights == "hub" else "local-dir:"
            kwargs = {k: resolve_layer(k, v) for k, v in recipe.create_kwargs.items()}
            net = timm.create_model(prefix + where, pretrained=True, num_classes=0, **kwargs)
        else:
            net = _transformers_load(recipe, where)
            build = {"library": "transformers", "architecture": recipe.architecture, "config": net.config.to_dict()}
    except (WeightsError, RecipeError):
        raise
    except Exception as e:  # noqa: BLE001 - hub and file failures become one line
        if weights == "hub" and _from_the_hub(e):
            raise hub_error(recipe.hub_id, e) from e
        text = str(e).splitlines()[0] if str(e) else ""
        config = repo_path(recipe, weights, recipe.config_file)  # present: _repo_config read it
        fix = f"`hf download {recipe.hub_id} --force-download`" if weights == "hub" else "a fresh copy of the repo"
        raise WeightsError(f"{config}: {recipe.title} cannot be built or loaded from the network this file describes "
                           f"({type(e).__name__}: {text}); an edited or foreign file? restore the repo's own ({fix})") from e
    return net, build, None


def _from_the_hub(e: Exception) -> bool:
    """An error of the hub client or the network (not of building the model from the downloaded files)."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in ("huggingface_hub", "httpx", "requests", "urllib3")


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


def _preprocessor_config(recipe: Recipe, weights: str) -> dict:
    """A transformers repo's preprocessor_config.json where it is at hand (cache or folder), else {}."""
    if weights == "hub":
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(recipe.hub_id, "preprocessor_config.json")
        path = Path(path) if isinstance(path, str) else None
    elif weights.startswith("dir:"):
        path = Path(weights.removeprefix("dir:")).expanduser() / "preprocessor_config.json"
    else:
        path = None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def downloaded_constants(recipe: Recipe, weights: str, repo_config: dict) -> dict:
    """mean / std / interpolation as the downloaded files state them (timm's pretrained_cfg in
    config.json, transformers' preprocessor_config.json); missing entries are left out."""
    if recipe.library == "timm":
        pcfg = repo_config.get("pretrained_cfg") or {}
        return {k: pcfg[k] for k in ("mean", "std", "interpolation") if k in pcfg}
    proc = _preprocessor_config(recipe, weights)
    out = {"mean": proc.get("image_mean"), "std": proc.get("image_std"),
           "interpolation": {2: "bilinear", 3: "bicubic"}.get(proc.get("resample"))}
    return {k: v for k, v in out.items() if v is not None}


def _check_config_constants(recipe: Recipe, weights: str, repo_config: dict) -> None:
    """Say so when the downloaded files carry other constants than the card's (the recipe wins)."""
    for key, theirs in downloaded_constants(recipe, weights, repo_config).items():
        ours = getattr(recipe, key)
        differs = theirs != ours if isinstance(theirs, str) else any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours))
        if differs:
            print(f"note: {recipe.hub_id}'s downloaded config says {key} {theirs}; the recipe uses {ours} "
                  f"(override with model.recipe_overrides.{key} if the card says otherwise)")


class FoundationBackbone(nn.Module):
    """A foundation model as its card prescribes: image batch -> tokens (or pooled features) -> the card's
    embedding; `projection` holds a vision-language model's image projection (MedImageInsight)."""

    def __init__(self, recipe: Recipe, net: nn.Module, build: dict, check_dim: bool = True):
        super().__init__()
        self.recipe, self.net, self.build = recipe, net, build
        if recipe.library == "timm":
            self.num_prefix_tokens, width = getattr(net, "num_prefix_tokens", 0), net.num_features
        else:
            self.num_prefix_tokens = 1 + getattr(net.config, "num_register_tokens", 0)
            width = net.config.hidden_size
        if recipe.embedding in ("pooled", "projected") and recipe.library != "timm":
            raise RecipeError(f"{recipe.title}: embedding '{recipe.embedding}' needs a timm network (its pooled features)")
        self.projection = None
        if build.get("projection_dim"):  # filled by the checkpoint (strict loading), never left random in use
            self.projection = nn.Parameter(torch.zeros(width, build["projection_dim"], device=_device(net)),
                                           requires_grad=False)
        if recipe.embedding == "projected" and self.projection is None:
            raise RecipeError(f"{recipe.title}: embedding 'projected' needs a checkpoint with an image projection")
        self.num_features = {"cls+mean": 2 * width, "projected": build.get("projection_dim")}.get(recipe.embedding, width)
        if self.num_features != recipe.embed_dim and check_dim:
            raise RecipeError(f"{recipe.title}: the loaded model embeds {self.num_features} values, the card "
                              f"{recipe.embed_dim}: another model, other creation arguments than the card's, or an "
                              f"embedding rule changed without recipe_overrides.embed_dim")
        # timm's pretrained config of the network, overlaid by the card's values (the recipe decides)
        base = net.pretrained_cfg if recipe.library == "timm" else {}
        self.preprocess = Preprocess.from_data_config(
            base, mean=recipe.mean, std=recipe.std, size=recipe.input_size, interpolation=recipe.interpolation,
            crop_pct=recipe.crop_pct)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """B x T x D tokens after the final norm: class token, registers, patch tokens."""
        if self.recipe.library == "timm":
            return self.net.forward_features(x)
        return self.net(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule = self.recipe.embedding
        if rule not in ("pooled", "projected"):
            return pool_tokens(self.tokens(x), rule, self.num_prefix_tokens)
        pooled = self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # timm: pool (+ norm)
        if rule == "pooled":
            return pooled
        return F.normalize(pooled @ self.projection.to(pooled.dtype), dim=-1)  # the card's image embedding

    @property
    def timm_model(self) -> nn.Module:
        if self.recipe.library != "timm":
            raise WeightsError(f"{self.recipe.title}: partial fine-tuning (model.train_last_blocks) needs a timm backbone")
        return self.net


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def pool_tokens(tokens: torch.Tensor, rule: str, num_prefix_tokens: int) -> torch.Tensor:
    """The embedding rule: 'cls' (class token), 'mean' (mean of the patch tokens, registers left out),
    'cls+mean' (both, concatenated)."""
    cls, patches = tokens[:, 0], tokens[:, num_prefix_tokens:]
    if rule == "cls":
        return cls
    if rule == "mean":
        return patches.mean(1)
    return torch.cat([cls, patches.mean(1)], dim=-1)


def load_foundation(recipe: Recipe, weights: str) -> FoundationBackbone:
    """The recipe's backbone with weights from `weights` (hub | dir:PATH | file:PATH | none)."""
    repo_config = _repo_config(recipe, weights)
    net, build, state = _load(recipe, weights, repo_config)
    check_input_size(recipe, net)
    standin = bool(repo_config.get(STANDIN_KEY))
    if standin:
        print(f"WARNING: {weights} holds a STAND-IN for {recipe.title} (random weights written by `histoshift "
              "fm-standin`): the pipeline runs, the features mean nothing")
    _check_config_constants(recipe, weights, repo_config)
    backbone = FoundationBackbone(recipe, net.eval(), build, check_dim=not standin)
    if state is not None:
        where = weights if weights.startswith("file:") else f"{weights} ({recipe.weights_file})"
        load_into(backbone, state, where)  # strict: a missing, extra or misshaped tensor stops with its name
    return backbone


def rebuild_foundation(recipe: Recipe, build: dict) -> FoundationBackbone:
    """The backbone a finished run recorded, random weights (its checkpoint follows): no hub needed."""
    return FoundationBackbone(recipe, build_network(build, recipe), build, check_dim=False)
