"""A backbone tuned for stain robustness (`model.robustify`; the `robustify` stage trains it): what identifies it,
how it is made trainable, and how the tuned weights are put back into a freshly loaded backbone.

Two methods: LoRA adapters (peft) on the attention layers of a foundation recipe, merged into the weights when
applied (the backbone keeps its own layers and key names, so a fine-tuned run's checkpoint loads without peft);
or partial fine-tuning of a timm CNN's last block groups, saved as the whole backbone's state. The tuned folder
`work/robust/<key>/` is keyed by the base backbone's identity (recipe or timm name, the weights' identity), every
robustify setting and the cache's id; its meta.json (written last) records the tuned file's digest, which the
feature store's key and a run's lineage carry (a backbone tuned again makes them recompute or refuse).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from torch import nn

from ..errors import HistoshiftError
from ..lineage import StaleError, digest_file

TUNED = "tuned.safetensors"
META = "meta.json"
DEFAULT_TARGETS = {"timm": ["qkv"], "transformers": ["query", "value"]}  # LoRA's usual attention targets


class RobustifyError(HistoshiftError, ValueError):
    """A backbone the configured robustify method cannot tune."""


def weights_identity(m) -> dict:
    """What identifies a non-recipe backbone's weights without loading them (a missing file is left to the weight
    loader, which names it)."""
    from .foundation.hub import local_identity

    source = m.source
    if source.kind == "file":
        path = source.path.resolve()
        if path.exists():
            return local_identity(path)
    return {"source": str(source)}


def backbone_identity(m) -> dict:
    """The base backbone of a model section, resolved: every recipe field and the weights' identity (hub commit
    or local files), or the timm name, its kwargs and input side with the weights' identity."""
    if m.recipe:
        from .foundation import resolve_recipe
        from .foundation.hub import source_identity

        recipe = resolve_recipe(m.recipe, m.recipe_overrides)
        return {"recipe": dataclasses.asdict(recipe), "weights": source_identity(recipe, m.source)}
    return {"timm": m.backbone, "timm_kwargs": m.timm_kwargs, "input_size": m.input_size,
            "weights": weights_identity(m)}


def method_of(m) -> str:
    r = m.robustify
    return r.method if r.method != "auto" else ("lora" if m.recipe else "partial")


def robust_folder(m, cache_id: str, root: Path) -> tuple[dict, Path]:
    """(spec, folder) of the tuned backbone of model section `m` under `root` (work/robust/)."""
    spec = {"backbone": backbone_identity(m), "robustify": m.robustify.model_dump(exclude={"checkpoint_every"}),
            "method": method_of(m), "cache": cache_id}
    base = spec["backbone"]["recipe"]["name"] if m.recipe else m.backbone
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return spec, Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}-{spec['method']}-{digest}")


def robust_identity(m, cache_id: str, root: Path) -> dict:
    """The finished tuned backbone's identity for lineage and store keys: its folder's key and its file's digest;
    one line naming the stage to run when it is missing or unfinished."""
    _, folder = robust_folder(m, cache_id, root)
    if not (folder / META).exists():
        raise StaleError(f"model.robustify: no tuned backbone for this config, cache and settings ({folder} is missing "
                         "or unfinished); run `histoshift robustify --config <this config>` first (train.sh does)")
    meta = json.loads((folder / META).read_text())
    return {"key": folder.name, "tuned": meta["tuned"], "method": meta["method"]}


def _lora_targets(backbone: nn.Module, m) -> list[str]:
    targets = m.robustify.lora_targets or DEFAULT_TARGETS.get(getattr(backbone, "recipe", None) and
                                                              backbone.recipe.library, ["qkv"])
    names = [n for n, mod in backbone.named_modules() if isinstance(mod, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        what = m.recipe or m.backbone
        raise RobustifyError(f"model.robustify: {what} has no linear layers named {targets} to take LoRA adapters; "
                             "set model.robustify.lora_targets to layer names it has, or method: partial")
    return targets


def make_trainable(backbone: nn.Module, m) -> tuple[nn.Module, str]:
    """The backbone with only what robustify tunes left trainable: LoRA adapters injected by peft, or the last
    `cnn_last_blocks` block groups. Returns it and the method."""
    method = method_of(m)
    r = m.robustify
    for p in backbone.parameters():
        p.requires_grad_(False)
    if method == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise RobustifyError("model.robustify: LoRA needs the peft package (pip install peft; it is in "
                                 "requirements.txt and the [fm] extra)") from None
        config = LoraConfig(r=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=0.0,
                            target_modules=_lora_targets(backbone, m))
        backbone = inject_adapter_in_model(config, backbone)  # only the adapters train
    else:
        from .backbone import freeze_all_but_last

        inner = getattr(backbone, "timm_model", backbone)
        if not hasattr(inner, "group_matcher"):
            raise RobustifyError(f"model.robustify: method partial needs a timm network with block groups; "
                                 f"{m.recipe or m.backbone} has none (use method: lora)")
        for p in backbone.parameters():
            p.requires_grad_(True)
        freeze_all_but_last(backbone, r.cnn_last_blocks)
    return backbone, method


def tuned_state(backbone: nn.Module, method: str) -> dict:
    """What the robustify stage saves: the LoRA adapters (peft's state dict), or the whole CNN backbone."""
    if method == "lora":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(backbone)
    else:
        state = backbone.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def apply_robust(backbone: nn.Module, m, folder: Path) -> nn.Module:
    """The tuned weights of `folder` put into a freshly loaded base backbone (its digest checked against meta.json);
    returns the backbone to use (LoRA merged: same layers and keys as before)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / META).read_text())
    if digest_file(folder / TUNED) != meta["tuned"]:
        raise StaleError(f"{folder / TUNED}: does not match the digest in its meta.json (changed since it was tuned); "
                         "run `histoshift robustify --force --config <this config>`")
    state = load_file(str(folder / TUNED))
    if meta["method"] == "lora":
        from peft import LoraConfig, LoraModel, set_peft_model_state_dict

        r = m.robustify
        config = LoraConfig(r=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=0.0,
                            target_modules=_lora_targets(backbone, m))
        # peft's tuner around the backbone (its keys gain "model."; the adapters were saved from the bare backbone
        # that inject_adapter_in_model tuned), then peft's merge_and_unload: the backbone's own layers and keys
        tuner = LoraModel(backbone, config, "default")
        result = set_peft_model_state_dict(tuner, {f"model.{k}": v for k, v in state.items()})
        if getattr(result, "unexpected_keys", None):
            raise StaleError(f"{folder / TUNED}: adapters that do not fit this backbone ({result.unexpected_keys[:3]})")
        return tuner.merge_and_unload(progressbar=False)
    backbone.load_state_dict(state)  # strict: the whole tuned CNN
    return backbone
