"""Adapters for weights that come from another codebase than timm or transformers: read that codebase's
architecture file, keep the image tower's tensors, rename their keys onto a timm architecture.

`unicl-davit`: MedImageInsight (lion-ai/MedImageInsights, the UniCL codebase). Sources:
  - MedImageInsight/UniCLModel.py: the checkpoint is one safetensors file holding the whole vision-language
    model (`image_encoder.*`, `lang_encoder.*`, `image_projection` [2048 x 1024], `lang_projection`,
    `logit_scale`); older files name them `visual.*` / `vision_projection` (its `_convert_old_weights`);
    `encode_image` = L2-normalise(image_encoder.forward_features(x) @ image_projection).
  - MedImageInsight/ImageEncoder/davit_v1.py: `convs.i` (ConvEmbed: proj, norm; stage 0 norms after the
    conv, stages 1-3 before it), `blocks.i.j.{spatial,channel}_block.{conv1.fn.dw, window_attn|channel_attn
    (.norm, .fn), conv2.fn.dw, ffn (.norm, .fn.net)}`, `norms` (LayerNorm after the mean pool); older files
    use `conv_embeds`, `main_blocks.i.j.{0,1}.{cpe.0.proj, attn, cpe.1.proj, mlp, norm1, norm2}` (its
    `_try_remap_keys`).
  - timm's davit_*_fl (the Florence-2 towers) are that architecture: timm's own Florence-2 converter
    (`_convert_florence2` in timm/models/davit.py) is the map below, plus `norms` -> `head.norm`.
timm loads the `_fl` variants non-strictly (a file that does not match would stay silently random), so
nothing here goes through timm's pretrained loading: the renamed dict is loaded strictly by the caller.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..weights import WeightsError
from .recipe import STANDIN_KEY

# the one DaViT that timm's `_fl` variants implement: patch convs 7/3/3/3, strides 4/2/2/2, paddings
# 3/1/1/1, norm before the conv in stages 1-3, as many channel-attention groups as heads
FIXED_SPEC = {"PATCH_SIZE": [7, 3, 3, 3], "PATCH_STRIDE": [4, 2, 2, 2], "PATCH_PADDING": [3, 1, 1, 1],
               "PATCH_PRENORM": [False, True, True, True]}

# MedImageInsight's block layers (after its own old->new renaming) -> timm's
_BLOCK_LAYERS = {"conv1.fn.dw": "cpe1.proj", "conv2.fn.dw": "cpe2.proj", "window_attn.norm": "norm1",
                 "channel_attn.norm": "norm1", "window_attn.fn": "attn", "channel_attn.fn": "attn",
                 "ffn.norm": "norm2", "ffn.fn.net": "mlp"}
# the older naming of the same layers, inside main_blocks.i.j.{0: spatial, 1: channel}
_OLD_LAYERS = {"cpe.0.proj": "conv1.fn.dw", "cpe.1.proj": "conv2.fn.dw", "mlp": "ffn.fn.net",
               "norm2": "ffn.norm"}
_OLD_ATTN = {"0": ("spatial_block", "window_attn"), "1": ("channel_block", "channel_attn")}


def _split(rest: str, table: dict) -> tuple[str, str] | None:
    """('window_attn.fn', 'qkv.weight') for 'window_attn.fn.qkv.weight': the longest table key that prefixes rest."""
    for layer in sorted(table, key=len, reverse=True):
        if rest.startswith(layer + "."):
            return layer, rest[len(layer) + 1:]
    return None


class UniCLDaViT:
    """MedImageInsight's checkpoint and config.yaml onto timm's DaViT (`davit_huge_fl` at full size)."""

    ENCODER_PREFIXES = ("image_encoder.", "visual.")
    projection_dim = 1024  # UNICL_MODEL.DIM_PROJECTION of 2024.09.27/config.yaml (when no config is at hand)
    PROJECTIONS = ("image_projection", "vision_projection")

    # -- the architecture file ------------------------------------------------------------------------
    def read_config(self, path: Path) -> dict:
        """The repo's config.yaml -> timm model_args, projection width and the stated preprocessing
        (mean, std, side, resize rule); a spec timm's DaViT cannot build stops with one line."""
        import yaml

        try:
            cfg = yaml.safe_load(Path(path).read_text())
            enc, spec = cfg["IMAGE_ENCODER"], cfg["IMAGE_ENCODER"]["SPEC"]
            projection_dim = int(cfg["UNICL_MODEL"]["DIM_PROJECTION"])
            model_args = {"depths": list(spec["DEPTHS"]), "embed_dims": list(spec["DIM_EMBED"]),
                          "num_heads": list(spec["NUM_HEADS"]), "window_size": int(spec.get("WINDOW_SIZE", 7))}
            groups = list(spec.get("NUM_GROUPS", spec["NUM_HEADS"]))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: not a MedImageInsight config.yaml ({type(e).__name__}: {e})") from None
        if enc.get("NAME") != "davit_v1":
            raise WeightsError(
                f"{path}: IMAGE_ENCODER.NAME is {enc.get('NAME')!r}; only davit_v1 maps onto timm's DaViT"
            )
        for key, want in FIXED_SPEC.items():
            if key in spec and list(spec[key]) != want:
                raise WeightsError(f"{path}: IMAGE_ENCODER.SPEC.{key} is {spec[key]}; timm's davit_*_fl builds {want}")
        if groups != model_args["num_heads"]:
            raise WeightsError(f"{path}: SPEC.NUM_GROUPS {groups} differ from NUM_HEADS; timm's DaViT uses one number")
        side = enc.get("IMAGE_SIZE", [480, 480])
        return {"model_args": model_args, "projection_dim": projection_dim,
                "pretrained_cfg": {"input_size": [3, int(side[0]), int(side[1])],
                                   "mean": list(enc.get("IMAGE_MEAN", ())), "std": list(enc.get("IMAGE_STD", ())),
                                   "interpolation": (cfg.get("AUG") or {}).get("INTERPOLATION", "bicubic"),
                                   "center_crop": bool((cfg.get("TEST") or {}).get("CENTER_CROP", False))},
                STANDIN_KEY: bool(cfg.get(STANDIN_KEY))}

    # -- the weights file -----------------------------------------------------------------------------
    def keep(self, key: str) -> bool:
        """Tensors to read: the image tower and its projection (the text tower is never loaded)."""
        return key.startswith(self.ENCODER_PREFIXES) or key in self.PROJECTIONS

    def timm_key(self, key: str, source: str) -> str:
        """One image-encoder key (prefix stripped), either naming, -> timm's DaViT key."""
        key = re.sub(r"^conv_embeds\.", "convs.", key)
        m = re.match(r"^main_blocks\.(\d+)\.(\d+)\.([01])\.(.+)$", key)
        if m:  # the older block naming -> the current one
            i, j, kind, rest = m.groups()
            block, attn = _OLD_ATTN[kind]
            table = {**_OLD_LAYERS, "attn": f"{attn}.fn", "norm1": f"{attn}.norm"}
            hit = _split(rest, table)
            if hit is None:
                raise WeightsError(f"{source}: cannot map key {key} (unknown layer in an old-style block)")
            key = f"blocks.{i}.{j}.{block}.{table[hit[0]]}.{hit[1]}"
        if m := re.match(r"^convs\.0\.(proj|norm)\.(.+)$", key):
            return f"stem.{'conv' if m[1] == 'proj' else 'norm'}.{m[2]}"
        if m := re.match(r"^convs\.(\d+)\.(proj|norm)\.(.+)$", key):
            return f"stages.{m[1]}.downsample.{'conv' if m[2] == 'proj' else 'norm'}.{m[3]}"
        if m := re.match(r"^blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\.(.+)$", key):
            hit = _split(m[4], _BLOCK_LAYERS)
            if hit is not None:
                return f"stages.{m[1]}.blocks.{m[2]}.{m[3]}.{_BLOCK_LAYERS[hit[0]]}.{hit[1]}"
        if m := re.match(r"^norms\.(.+)$", key):
            return f"head.norm.{m[1]}"
        raise WeightsError(f"{source}: cannot map key {key} onto timm's DaViT")

    def convert(self, tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The file's kept tensors -> (timm DaViT state dict, image projection). Missing projection, an
        unmappable key or two keys onto one stop with one line naming them."""
        projection = next((tensors[k] for k in self.PROJECTIONS if k in tensors), None)
        if projection is None:
            raise WeightsError(f"{source}: no image_projection (nor vision_projection) tensor: not a UniCL / "
                               "MedImageInsight checkpoint")
        encoder: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key in self.PROJECTIONS:
                continue
            prefix = next(p for p in self.ENCODER_PREFIXES if key.startswith(p))
            name = self.timm_key(key[len(prefix):], source)
            if name in encoder:
                raise WeightsError(f"{source}: two tensors map onto {name} (both namings in one file?)")
            encoder[name] = value
        return encoder, projection

    # -- stand-ins: the inverse, to write a file in the hub repo's own key names ------------------------
    def hub_key(self, timm_key: str) -> str:
        """timm's DaViT key -> MedImageInsight's current key (with the `image_encoder.` prefix)."""
        if m := re.match(r"^stem\.(conv|norm)\.(.+)$", timm_key):
            key = f"convs.0.{'proj' if m[1] == 'conv' else 'norm'}.{m[2]}"
        elif m := re.match(r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", timm_key):
            key = f"convs.{m[1]}.{'proj' if m[2] == 'conv' else 'norm'}.{m[3]}"
        elif m := re.match(
            r"^stages\.(\d+)\.blocks\.(\d+)\.(spatial_block|channel_block)\.(cpe1\.proj|cpe2\.proj|norm1|norm2|attn|mlp)\.(.+)$",
            timm_key,
        ):
            other = "channel_attn" if m[3] == "spatial_block" else "window_attn"  # the other block's layers
            inverse = {timm: ours for ours, timm in _BLOCK_LAYERS.items() if not ours.startswith(other)}
            key = f"blocks.{m[1]}.{m[2]}.{m[3]}.{inverse[m[4]]}.{m[5]}"
        elif m := re.match(r"^head\.norm\.(.+)$", timm_key):
            key = f"norms.{m[1]}"
        else:
            raise KeyError(timm_key)
        return "image_encoder." + key


ADAPTERS = {"unicl-davit": UniCLDaViT()}
