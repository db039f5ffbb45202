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

import torch
import torch.nn.functional as F
from torch import nn

from ...records import WeightSource
from ..preprocess import Preprocess
from ..weights import WeightsError, load_into
from .build import build_network, check_config_constants, check_input_size, load_network
from .hub import repo_config as read_repo_config
from .recipe import STANDIN_KEY, Recipe, RecipeError


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
            raise RecipeError(
                f"{recipe.title}: embedding '{recipe.embedding}' needs a timm network (its pooled features)"
            )
        self.projection = None
        if build.get("projection_dim"):  # filled by the checkpoint (strict loading), never left random in use
            self.projection = nn.Parameter(torch.zeros(width, build["projection_dim"], device=_device(net)),
                                           requires_grad=False)
        if recipe.embedding == "projected" and self.projection is None:
            raise RecipeError(f"{recipe.title}: embedding 'projected' needs a checkpoint with an image projection")
        self.num_features = {"cls+mean": 2 * width, "projected": build.get("projection_dim")}.get(
            recipe.embedding, width
        )
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
            raise WeightsError(
                f"{self.recipe.title}: partial fine-tuning (model.train_last_blocks) needs a timm backbone"
            )
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


def load_foundation(recipe: Recipe, weights: WeightSource | str) -> FoundationBackbone:
    """The recipe's backbone with weights from `weights` (hub | dir:PATH | file:PATH | none; text is parsed)."""
    if isinstance(weights, str):
        weights = WeightSource.parse(weights, recipe=True)
    repo_config = read_repo_config(recipe, weights)
    net, build, state = load_network(recipe, weights, repo_config)
    check_input_size(recipe, net)
    standin = bool(repo_config.get(STANDIN_KEY))
    if standin:
        print(f"WARNING: {weights} holds a STAND-IN for {recipe.title} (random weights written by `histoshift "
              "fm-standin`): the pipeline runs, the features mean nothing")
    check_config_constants(recipe, weights, repo_config)
    backbone = FoundationBackbone(recipe, net.eval(), build, check_dim=not standin)
    if state is not None:
        where = str(weights) if weights.kind == "file" else f"{weights} ({recipe.weights_file})"
        load_into(backbone, state, where)  # strict: a missing, extra or misshaped tensor stops with its name
    return backbone


def rebuild_foundation(recipe: Recipe, build: dict) -> FoundationBackbone:
    """The backbone a finished run recorded, random weights (its checkpoint follows): no hub needed."""
    return FoundationBackbone(recipe, build_network(build, recipe), build, check_dim=False)
