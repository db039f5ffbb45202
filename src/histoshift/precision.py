"""Mixed precision, shared by training, inference and embedding: which dtype a run uses, and the
autocast context that applies it to one block of work."""
from __future__ import annotations

import torch

FP32_FAMILIES = ("efficientnet", "mobilenet", "mixnet", "mnasnet", "ghostnet")  # depthwise convs: bf16 was slower


def resolve_precision(precision: str, backbone: str = "", preferred: str | None = None) -> str:
    """'auto': off on CPU; on a GPU the recipe's `preferred` dtype (a foundation model's card), else bf16
    where supported unless the backbone family runs faster in fp32. Anything else is taken as asked."""
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "no"
    bf16 = torch.cuda.is_bf16_supported()
    if preferred:
        return "fp16" if preferred == "bf16" and not bf16 else preferred
    if any(f in backbone for f in FP32_FAMILIES):
        return "no"
    return "bf16" if bf16 else "no"


def config_precision(cfg) -> str:
    """The precision a config's run uses on this machine (a recipe's card precision under 'auto')."""
    preferred = None
    if cfg.model.recipe:
        from .models.foundation import resolve_recipe

        preferred = resolve_recipe(cfg.model.recipe, cfg.model.recipe_overrides).precision
    return resolve_precision(cfg.train.precision, cfg.model.backbone, preferred)


def autocast(device: torch.device, precision: str):
    """Mixed precision for one block of work, whatever the precision of the process's Accelerator."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
