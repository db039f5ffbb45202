"""A backbone with a one-logit tumour head; forward returns named outputs.

The backbone is a timm model by name, or a pathology foundation model by recipe
(`models/foundation`): then the recipe states the input side, resize rule and normalisation."""
from __future__ import annotations

import timm
from timm.models import group_parameters
import torch
from torch import nn

from ..config import BackboneCfg
from ..records import WeightSource
from .preprocess import Preprocess
from .foundation import override, resolve_recipe
from .foundation.build import resolve_layer
from .foundation.loader import load_foundation, rebuild_foundation
from .weights import WeightsError, load_into, package_state_dict, read_state_dict


def create_backbone(cfg: BackboneCfg, load_weights: bool = True, build: dict | None = None) -> nn.Module:
    """timm.create_model with the configured weight source, or a foundation recipe's backbone
    (`load_weights=False`: architecture only; with a recipe, as the run's recorded `build` describes)."""
    drop_path = cfg.stochastic_depth  # the kind says (fine-tuned backbones: model.drop_path_rate; frozen ones: 0)
    source = cfg.source if load_weights else WeightSource("none")
    if cfg.recipe:
        recipe = resolve_recipe(cfg.recipe, cfg.recipe_overrides)
        if drop_path > 0:
            if recipe.library != "timm":
                raise WeightsError(f"model.drop_path_rate: applied to timm backbones only, {recipe.title} is not one")
            recipe = override(recipe, {"create_kwargs": {"drop_path_rate": drop_path}})
        if not load_weights and build is not None:
            return rebuild_foundation(recipe, build)
        return load_foundation(recipe, source)
    kwargs = {k: resolve_layer(k, v) for k, v in cfg.timm_kwargs.items()}
    kwargs["num_classes"] = 0
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    use_timm = source.kind == "timm"
    try:
        model = timm.create_model(cfg.backbone, pretrained=use_timm, **kwargs)
    except Exception as e:  # hub unreachable, gated repo, unknown name...
        if use_timm or cfg.backbone.startswith("hf-hub:"):
            raise WeightsError(
                f"could not create '{cfg.backbone}' with timm's pretrained weights: {type(e).__name__}: {e}. "
                "Hub weights need network access to the Hugging Face hub (and a token for gated models); "
                "offline, point model.weights at a local file (file:PATH) or a package (package:NAME)."
            ) from e
        raise
    if source.kind == "file":
        load_into(model, read_state_dict(source.path), str(source.path))
    elif source.kind == "package":
        load_into(model, package_state_dict(source.value, model), str(source))
    return model


def freeze_all_but_last(backbone: nn.Module, n_blocks: int) -> int:
    """Partial fine-tuning: leave only the last `n_blocks` coarse block groups of a timm backbone
    trainable (timm's `group_matcher`: stem, blocks..., final norm with the last). Returns how many
    parameter tensors no longer train."""
    if n_blocks < 0:
        return 0
    backbone = getattr(backbone, "timm_model", backbone)  # a foundation backbone: its timm network
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    first_kept = max(groups) - n_blocks + 1
    keep = {name for gid, names in groups.items() if gid >= first_kept for name in names}
    fixed = 0
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in keep)
        fixed += name not in keep
    return fixed


class PatchClassifier(nn.Module):
    """Backbone -> pooled features -> dropout -> one tumour logit."""

    def __init__(self, cfg: BackboneCfg, load_weights: bool = True, build: dict | None = None):
        super().__init__()
        self.backbone = create_backbone(cfg, load_weights, build)
        freeze_all_but_last(self.backbone, cfg.trainable_blocks)
        self.num_features = self.backbone.num_features
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(self.num_features, 1))
        if cfg.recipe:
            self.preprocess = self.backbone.preprocess
        else:
            # mean/std and resize rule from timm's pretrained config; the side is the configured one and
            # there is no centre crop: timm's crop_pct is ImageNet evaluation's, and a 96 px patch's label
            # may depend on its whole area (the whole patch is what every view and the heads see)
            self.preprocess = Preprocess.from_data_config(timm.data.resolve_model_data_config(self.backbone),
                                                          size=cfg.input_size, crop_pct=1.0)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing after an optimizer step (a sparse head on features does its proximal step here)."""

    def sparsity(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "logits": self.head(features).squeeze(1)}
