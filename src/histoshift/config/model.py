"""The model section, one class per kind of model (`model.kind`), chosen by pydantic as a tagged union:

  image    a backbone fine-tuned on images (tasks/image.py)
  feature  a head trained on features the frozen backbone stored once (the `embed` stage; tasks/feature.py)

Each kind holds only the fields it uses, so a head-only setting on a fine-tuned config is an unknown key,
not a rule in a validator. The kind is read once, here; code asks `cfg.model.kind`. Configs written before
the kinds existed (`frozen: true|false`) still load, with one deprecation line.
"""
from __future__ import annotations

import sys
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BeforeValidator, Field, model_validator

from ..records import WeightSource
from .base import Float, Int, NonNeg, Section

FEATURE_SHIFTS = ("none", "standardize", "coral")  # models/feature_shift.py implements them
KINDS = ("image", "feature")
# feature-store settings that older configs kept in the train section (moved here with a deprecation line)
STORE_KEYS = ("feature_views", "feature_hed_views", "feature_hed_sigma", "embed_batch_size")
_said: set[str] = set()


def deprecated(line: str) -> None:
    """One line on stderr for a config written the old way (once per `load_config`: `forget_deprecations`)."""
    if line not in _said:
        _said.add(line)
        print(f"config: {line}", file=sys.stderr)


def forget_deprecations() -> None:
    _said.clear()


class RobustifyCfg(Section):
    """Stain-robust fine-tuning of the backbone before it is used (the `robustify` stage; arXiv 2607.22861's
    objective on stain views): two stain views of one unlabelled patch of any center embed alike (InfoNCE)."""
    method: Literal["auto", "lora", "partial"] = "auto"  # auto: LoRA for foundation recipes, partial for timm CNNs
    steps: Int = Field(300, ge=1)
    batch_size: Int = Field(32, ge=2)  # patches a step, two views each (every other patch is a negative)
    lr: Float = Field(1e-4, gt=0)  # AdamW, linear warm-up (10%) then cosine
    temperature: Float = Field(0.1, gt=0)
    hed_sigma: NonNeg = 0.2  # each view: a random dihedral view with HED stain jitter of this strength
    # the second view: hed = the same patch jittered again; reinhard = first given the CIELAB statistics of a
    # random patch of another center (Reinhard transfer to that center's appearance), then jittered
    pair: Literal["hed", "reinhard"] = "hed"
    lora_rank: Int = Field(8, ge=1)
    lora_alpha: Float = Field(16.0, gt=0)
    # LoRA's target layers by name; [] = by the recipe's library (timm: qkv; transformers: query, value)
    lora_targets: list[str] = []
    cnn_last_blocks: Int = Field(2, ge=-1)  # partial: the last N block groups of a timm CNN train (-1: all)
    checkpoint_every: Int = Field(100, ge=1)  # steps between resumable states
    seed: Int = Field(0, ge=0)


class BackboneCfg(Section):
    """What both kinds share: the backbone and where its weights come from."""
    backbone: str = "tf_efficientnet_lite0"  # any timm name, including "hf-hub:org/name"
    # where the weights come from: parsed once into a WeightSource (records.py lists the forms: random init, timm's
    # own source, an offline package, a file; with a recipe the hub, a downloaded copy of the repo, a file)
    weights: str = "none"
    # a pathology foundation model by name (histoshift.models.foundation.RECIPES): the recipe states the
    # card's backbone, input size, interpolation, mean/std, embedding rule and precision; `backbone`,
    # `input_size` and `timm_kwargs` are then left alone and any recipe field is overridden here
    recipe: str = ""
    recipe_overrides: dict = {}
    input_size: Int = Field(96, ge=32)  # side the backbone sees; batches are resized on the device when it differs
    # extra keyword arguments for timm.create_model (hub foundation models need some); values of
    # keys ending in "_layer" may name a class, e.g. "torch.nn.SiLU" or "timm.layers.SwiGLUPacked"
    timm_kwargs: dict = {}
    drop_rate: Float = Field(0.2, ge=0, le=1)  # before the classifier (the backbone's, or the head's)
    # the backbone as the `robustify` stage tuned it for stain robustness (a new backbone identity: the feature
    # store's key and the run's lineage name it); None = the weights as loaded
    robustify: RobustifyCfg | None = None

    # what the rest of the package asks of a kind (never the kind itself): the backbone trains on images from the
    # cache (fine-tuned: stochastic depth, partial fine-tuning and image-altering losses apply), and how the
    # report names it
    fine_tuned: ClassVar[bool] = False

    @property
    def stochastic_depth(self) -> float:
        """The drop-path rate the backbone is built with."""
        return 0.0

    @property
    def trainable_blocks(self) -> int:
        """-1: every block group of the backbone (as built) trains; N: only the last N."""
        return -1

    def describe(self) -> str:
        """The model in the report's method column: the backbone, how it learns, robustified or not."""
        return (f"{self.recipe or self.backbone} {'fine-tuned' if self.fine_tuned else 'frozen'}"
                + (f" (robustified, {self.robustify.pair} pairs)" if self.robustify is not None else ""))

    def switches(self) -> list[tuple[str, object]]:
        """This kind's switches against the shift for the method column: (name, value or None when off)."""
        return []

    @property
    def source(self) -> WeightSource:
        """`weights` as the typed record (validated when the config was; a property, not cached, so that a copy
        with other weights never carries the old record)."""
        return WeightSource.parse(self.weights, recipe=bool(self.recipe))

    @model_validator(mode="after")
    def _recipe(self):
        if self.recipe:
            fixed = [k for k in ("backbone", "input_size", "timm_kwargs")
                     if getattr(self, k) != BackboneCfg.model_fields[k].default]
            if fixed:
                raise ValueError(
                    f"model.recipe={self.recipe} defines the backbone: leave model.{', model.'.join(fixed)} "
                    "unset and override the recipe instead, e.g. model.recipe_overrides.input_size=224"
                )
        elif self.recipe_overrides:
            raise ValueError("model.recipe_overrides: set model.recipe to the foundation model they modify")
        try:
            WeightSource.parse(self.weights, recipe=bool(self.recipe))
        except ValueError as e:
            raise ValueError(f"model.weights: {e}") from None
        return self


class ImageModelCfg(BackboneCfg):
    """A backbone fine-tuned on images."""
    kind: Literal["image"] = "image"
    embeds: ClassVar[bool] = False  # the `embed` stage has nothing to store: images are read from the cache
    fine_tuned: ClassVar[bool] = True
    drop_path_rate: Float = Field(0.0, ge=0, le=1)  # stochastic depth
    train_last_blocks: Int = -1  # partial fine-tuning: train only the last N block groups (-1 = all)

    @property
    def stochastic_depth(self) -> float:
        return self.drop_path_rate

    @property
    def trainable_blocks(self) -> int:
        return self.train_last_blocks


class FeatureModelCfg(BackboneCfg):
    """A head on features the frozen backbone stored once (the `embed` stage)."""
    kind: Literal["feature"] = "feature"
    embeds: ClassVar[bool] = True  # the `embed` stage stores its backbone's features once
    # "mlp" (a linear probe, or an MLP of head_hidden units) | "paper_dann" (the Phikon-v2 + DANN head report's
    # layers: LayerNorm, linear to D/2, ReLU; classifier D/2 -> 100 -> 1 with ReLU and dropout 0.4)
    head: Literal["mlp", "paper_dann"] = "mlp"
    head_hidden: Int = Field(0, ge=0)  # 0 = linear probe, > 0 = MLP with this hidden width
    # a sparse linear probe: L1 strength on its weights, applied as a proximal (soft-threshold) step after every
    # optimizer step so that dropped dimensions are exactly zero; optim.weight_decay is the elastic net's L2 part
    head_l1: NonNeg = 0.0
    # a map in front of the head that `infer --adapt` re-estimates on each target center's unlabelled features
    # (models/feature_shift.py): none | standardize (per center) | coral
    feature_shift: Literal[FEATURE_SHIFTS] = "none"
    coral_ridge: Float = Field(0.01, ge=0)  # CORAL: covariance + ridge x mean variance x I
    # rounds of self-training on the target center's confident predictions that `infer --adapt` runs after the
    # feature shift (models/self_training.py); 0 = off
    self_train_rounds: Int = Field(0, ge=0)
    self_train_threshold: Float = Field(0.9, gt=0.5, lt=1)  # the confidence a pseudo-label needs
    # the store: dihedral views embedded per patch; K extra views of every labelled patch, each a random dihedral
    # view with HED stain jitter of this strength, so that heads learn stain invariance (test patches keep the
    # 8 views); patches per embedding forward (x views), 0 = fitted to free GPU memory, a small batch on CPU
    feature_views: Literal[1, 8] = 8
    feature_hed_views: Int = Field(0, ge=0)
    feature_hed_sigma: NonNeg = 0.05
    embed_batch_size: Int = Field(0, ge=0)

    def describe(self) -> str:
        head = self.head if self.head != "mlp" else (f"MLP {self.head_hidden}" if self.head_hidden else "linear")
        return f"{super().describe()}, {head} head"

    def switches(self) -> list[tuple[str, object]]:
        return [("feature shift", self.feature_shift if self.feature_shift != "none" else None),
                ("self-training rounds", self.self_train_rounds or None)]

    @model_validator(mode="after")
    def _head(self):
        if self.head != "mlp" and (self.head_hidden or self.head_l1):
            raise ValueError(f"model.head={self.head}: a head with its own fixed layers (leave model.head_hidden and "
                             "model.head_l1 at 0)")
        if self.head_l1 > 0 and self.head_hidden:
            raise ValueError("model.head_l1: the sparse head is a linear probe (model.head_hidden: 0)")
        return self


# what the one model section of earlier versions held for the other kind, at its defaults: a resolved config
# those versions wrote into a run folder (every field, `frozen` among them) loads without them
OLD_DEFAULTS = {"drop_path_rate": 0.0, "train_last_blocks": -1, "head": "mlp", "head_hidden": 0, "head_l1": 0.0,
                "feature_shift": "none", "coral_ridge": 0.01, "self_train_rounds": 0, "self_train_threshold": 0.9,
                "feature_views": 8, "feature_hed_views": 0, "feature_hed_sigma": 0.05, "embed_batch_size": 0}


def _tag(value):
    """The kind of a model mapping: `kind`, or the deprecated `frozen` boolean, else image. A mapping written the old
    way (`frozen`) drops the other kind's fields where they hold their defaults (as every resolved config did)."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if "frozen" in value:
        frozen = value.pop("frozen")
        if not isinstance(frozen, bool):
            raise ValueError(f"model.frozen: expected a boolean, got {frozen!r} (write model.kind: image | feature)")
        kind = "feature" if frozen else "image"
        if value.setdefault("kind", kind) != kind:
            raise ValueError(f"model.frozen={frozen} contradicts model.kind={value['kind']}: keep model.kind only")
        deprecated(f"model.frozen: {str(frozen).lower()} is deprecated; write model.kind: {kind}")
        own = MODEL_KINDS[kind].model_fields
        value = {k: v for k, v in value.items() if k in own or k not in OLD_DEFAULTS or v != OLD_DEFAULTS[k]}
    value.setdefault("kind", "image")
    return value


def moved_store_keys(data: dict) -> dict:
    """Older configs kept the feature store's settings in the train section: moved to the model (one line)."""
    train, model = data.get("train"), data.get("model", {})
    moved = [k for k in STORE_KEYS if isinstance(train, dict) and k in train]
    if not moved or not isinstance(model, dict):
        return data
    if model.get("kind", "feature" if model.get("frozen") else "image") == "image":  # an old resolved config of a
        train = {k: v for k, v in train.items() if k not in moved or v != OLD_DEFAULTS[k]}  # fine-tuned run
        moved = [k for k in moved if k in train]
        if not moved:
            return {**data, "train": train}
    deprecated(f"train.{', train.'.join(moved)}: moved to the model section (model.kind: feature); write model.<key>")
    train = dict(train)
    return {**data, "train": train, "model": {**data.get("model", {}), **{k: train.pop(k) for k in moved}}}


MODEL_KINDS = {"image": ImageModelCfg, "feature": FeatureModelCfg}
ModelCfg = Annotated[Union[ImageModelCfg, FeatureModelCfg], BeforeValidator(_tag), Field(discriminator="kind")]
