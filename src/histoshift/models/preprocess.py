"""What a backbone expects of a float RGB batch in [0, 1]: its side, resize rule, centre crop and
mean/std, applied on the batch's device. One source for every backbone: `Preprocess.from_data_config`
takes timm's resolved data config (`timm.data.resolve_model_data_config`), which a foundation recipe
overlays with its card's values."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int, interpolation: str = "bilinear", crop_pct: float = 1.0) -> torch.Tensor:
    """Square float batch in [0, 1] -> `size` px: resized to size / crop_pct, then centre-cropped
    (crop_pct 1: no crop). Bicubic output is clamped to [0, 1], as a PIL or uint8 pipeline does."""
    resized = int(round(size / crop_pct))
    if x.shape[-1] != resized:
        x = F.interpolate(x, size=(resized, resized), mode=interpolation, antialias=interpolation != "nearest",
                          **({} if interpolation == "nearest" else {"align_corners": False}))
        if interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)
    if resized != size:
        top = (resized - size) // 2
        x = x[..., top:top + size, top:top + size]
    return x


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects of a float RGB batch in [0, 1]: side, resize rule and mean/std
    (from a foundation-model recipe, or from timm's pretrained config). Runs on the batch's device."""
    mean: tuple
    std: tuple
    size: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_data_config(cls, data_cfg: dict, **overlay) -> "Preprocess":
        """From a timm data config (mean, std, input_size (C, H, W), interpolation, crop_pct), with
        `overlay` (mean, std, size, interpolation, crop_pct) taking precedence: a recipe's card values,
        or the configured side for a plain timm backbone."""
        given = {"mean": data_cfg.get("mean"), "std": data_cfg.get("std"),
                 "size": (data_cfg.get("input_size") or (3, 224, 224))[-1],
                 "interpolation": data_cfg.get("interpolation"), "crop_pct": data_cfg.get("crop_pct", 1.0)}
        merged = {k: v for k, v in given.items() if v is not None} | overlay
        if merged.get("interpolation") not in ("bicubic", "bilinear"):  # e.g. timm's "random" or "bicubic_aa"
            merged["interpolation"] = "bilinear"
        return cls(tuple(merged["mean"]), tuple(merged["std"]), int(merged["size"]), merged["interpolation"],
                   float(merged["crop_pct"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(resize(x, self.size, self.interpolation, self.crop_pct), self.mean, self.std, self.size)


def normalize(x: torch.Tensor, mean, std, input_size: int) -> torch.Tensor:
    """Resize (bilinear, when the backbone wants another side) and normalise with the backbone's mean/std."""
    x = resize(x, input_size)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean).div_(std)  # one pass fewer over the batch than `/ std` (a 480 px batch is 166 MB)
