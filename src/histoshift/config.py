"""Typed experiment configuration: one YAML file per experiment plus `key.sub=value` overrides.

The sections are pydantic models: every field has a type, a default and (where it has one) its range
or its allowed values next to it. Unknown keys, wrong types, NaN/inf and out-of-range values raise
`ConfigError` naming the key, so a typo never silently trains the wrong model. Names that live in a
registry (a foundation recipe and its overrides) are checked by the stages that use them
(`tasks.load_experiment`), so this module imports no registry (and nothing that imports torch).
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      model_validator)

from .safeio import write_text

FEATURE_SHIFTS = ("none", "standardize", "coral")  # models/feature_shift.py implements them
ALGORITHM_NAMES = ("erm", "dann")  # the keys of histoshift.algorithms.ALGORITHMS (a test keeps them equal)


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a config file or override."""


RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _run_name(value: str) -> str:
    if not RUN_NAME.fullmatch(value):
        raise ValueError("must be a plain folder: 1-100 letters, digits, '.', '_' or '-', not starting with '.' "
                         f"(the run is written to work/runs/<it>/), got {value!r}")
    return value


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got boolean {value!r}")
    return value


# the tracker names Accelerate knows (accelerate.utils.LoggerType without "all"; a test keeps them equal)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def tracker_names(text: str) -> list[str]:
    """'tensorboard,wandb' -> the list, checked (ConfigError naming the unknown one)."""
    try:
        return _names(text)
    except ValueError as e:
        raise ConfigError(f"log_with: {e}") from None


def _names(value):
    """Trackers as a list: "tensorboard,wandb" or a YAML list; each one Accelerate knows."""
    names = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise ValueError(f"expected tracker names (a list or 'a,b'), got {value!r}")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r} (known: {', '.join(TRACKERS)})")
    return list(dict.fromkeys(names))


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
NonNeg = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


class ModelCfg(Section):
    backbone: str = "tf_efficientnet_lite0"  # any timm name, including "hf-hub:org/name"
    # "none" | "timm" (timm's own pretrained source: HF hub or URL) | "file:PATH" | "package:NAME";
    # with a recipe: "hub" (the Hugging Face hub or its local cache) | "dir:PATH" (a downloaded copy of
    # the hub repo, e.g. a Kaggle dataset) | "file:PATH" (a weights file)
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
    drop_rate: Float = Field(0.2, ge=0, le=1)
    drop_path_rate: Float = Field(0.0, ge=0, le=1)
    # the task kind (tasks.py): False = fine-tune the backbone on images; True = embed once with the
    # frozen backbone (the `embed` stage) and train only a head on the stored features
    frozen: bool = False
    train_last_blocks: Int = -1  # partial fine-tuning: train only the last N block groups (-1 = all)
    head_hidden: Int = Field(0, ge=0)  # heads on features: 0 = linear probe, > 0 = MLP with this hidden width
    # heads on features: "mlp" (the probe or MLP above) | "paper_dann" (the Phikon-v2 + DANN head report's
    # layers: LayerNorm, linear to D/2, ReLU; classifier D/2 -> 100 -> 1 with ReLU and dropout 0.4)
    head: Literal["mlp", "paper_dann"] = "mlp"
    # heads on features: a map in front of the head that `infer --adabn` re-estimates on each target center's
    # unlabelled features (models/feature_shift.py): none | standardize (per center) | coral
    feature_shift: Literal[FEATURE_SHIFTS] = "none"
    coral_ridge: Float = Field(0.01, ge=0)  # CORAL: covariance + ridge x mean variance x I
    # a sparse linear probe: L1 strength on its weights, applied as a proximal (soft-threshold) step after every
    # optimizer step so that dropped dimensions are exactly zero; optim.weight_decay is the elastic net's L2 part
    head_l1: NonNeg = 0.0
    # heads on frozen features: rounds of self-training on the target center's confident predictions that
    # `infer --adabn` runs after the feature shift (models/self_training.py); 0 = off
    self_train_rounds: Int = Field(0, ge=0)
    self_train_threshold: Float = Field(0.9, gt=0.5, lt=1)  # the confidence a pseudo-label needs


class AlgorithmCfg(Section):
    name: str = "dann"  # a key of histoshift.algorithms.ALGORITHMS
    domain_weight: NonNeg = 0.1  # weight of the domain loss in the total loss
    domain_hidden: Int = Field(256, ge=1)  # width of the domain head's hidden layer
    # the domain head as the Phikon-v2 + DANN head recipe has it: linear, batch norm, ReLU, linear (no dropout)
    domain_batchnorm: bool = False
    grl_max: NonNeg = 1.0  # the Ganin schedule rises from 0 to this coefficient
    domain_loss: Literal["ce", "ls"] = "ce"  # cross-entropy | least squares on the softmax (LSGAN style)
    focal_gamma: NonNeg = 0.0  # focal loss exponent for the tumour loss (0 = plain BCE)
    entropy_weight: NonNeg = 0.0  # entropy minimisation on the unlabelled target centers (0 = off)
    # Stain-AgLr (DART 2022) as two switches for any algorithm; each image of a step also goes through
    # the model as a copy with HED stain alteration of strength `alter_sigma`
    consistency_weight: NonNeg = 0.0  # KL between the predictions for an image and for its altered copy
    regen_weight: NonNeg = 0.0  # a small decoder rebuilds the image (at regen_size px) from the copy's features
    alter_sigma: NonNeg = 0.1  # HED alteration of the copy: scale U(1-s, 1+s), shift U(-s, s) per channel
    regen_size: Int = 32  # side of the rebuilt image (the image average-pooled to it): 8, 16, 32 or 64
    # sample reweighting (algorithms/base.py observe): each labelled center's classes weigh the same in the
    # tumour loss (class imbalance, as the DMAN paper reweights); the domain loss weighs centers inversely
    # to their frequency (the Phikon-v2 + DANN head recipe)
    class_reweight: bool = False
    domain_reweight: bool = False

    @model_validator(mode="after")
    def _known(self):
        if self.name not in ALGORITHM_NAMES:
            raise ValueError(f"algorithm.name: unknown algorithm '{self.name}' (known: {sorted(ALGORITHM_NAMES)})")
        if self.regen_size not in (8, 16, 32, 64):
            raise ValueError(f"algorithm.regen_size: expected 8, 16, 32 or 64, got {self.regen_size}")
        return self


def optimizer_names() -> list[str]:
    """What `optim.name` takes: every optimizer timm's factory builds, and Nero (from pytorch-optimizer)."""
    from timm.optim import list_optimizers

    return sorted({*list_optimizers(), *EXTRA_OPTIMIZERS})


EXTRA_OPTIMIZERS = ("nero",)  # not in timm: taken from pytorch-optimizer (engine.build_optimizer)


class OptimCfg(Section):
    # a name of timm's optimizer factory (adamw, sgd, lamb, lars, adabelief, lion, ...) or nero; every
    # parameter group keeps its own learning rate (backbone, head, domain head)
    name: str = "adamw"
    lr: NonNeg = 1e-3  # classifier head
    backbone_lr: NonNeg = 3e-4
    domain_lr: NonNeg = 1e-3
    weight_decay: NonNeg = 1e-2
    warmup_frac: Float = Field(0.1, ge=0, le=1)  # share of steps with linear warm-up, then cosine decay to zero
    grad_clip: NonNeg = 1.0

    @model_validator(mode="after")
    def _known_optimizer(self):
        if self.name != "adamw" and self.name not in optimizer_names():  # the default needs no timm import (3 s)
            raise ValueError(f"optim.name: unknown optimizer {self.name!r} (known: {', '.join(optimizer_names())})")
        return self


class AugCfg(Section):
    # "torch" (whole batches on the device) | "albumentations" (per item, CPU workers)
    backend: Literal["torch", "albumentations"] = "torch"
    dihedral: bool = True  # random flips and 90-degree rotations (the 8 dihedral views)
    hed_sigma: NonNeg = 0.03  # HED stain jitter: scale ~ U(1-s, 1+s), shift ~ U(-s, s) per channel
    brightness: NonNeg = 0.1  # brightness/contrast jitter amplitude (0 = off)
    contrast: NonNeg = 0.1
    # per-patch normalisation, at training and inference; "gan": the `stain-gan` stage's generator colours the
    # grayscale patch in the target center's style (settings: the stain_gan section)
    stain_norm: Literal["none", "reinhard", "macenko", "gan"] = "none"
    # three equal channels (the luma), at training (after the colour jitter) and inference; a published report
    # of this competition: DINOv2 frozen 0.90560 -> 0.90911
    grayscale: bool = False
    # the stain-gan stage's generator when stain_norm is "gan": attached at run time by the task
    # (histoshift.stain_gan.attach), never read from or written to a config file
    _colourizer: object = PrivateAttr(default=None)

    @property
    def colourizer(self):
        return self._colourizer

    def attach_colourizer(self, colourizer) -> None:
        self._colourizer = colourizer


class TrainCfg(Section):
    epochs: Int = Field(3, ge=1)
    batch_size: Int = Field(64, ge=1)
    target_batch_size: Int = Field(32, ge=1)  # unlabelled images per step for the domain head (DANN)
    steps_per_epoch: Int = Field(0, ge=0)  # 0 = one pass over the labelled training patches
    probe_epochs: Int = Field(0, ge=0)  # linear probe first: the backbone's learning rate is 0 for these epochs
    # one round of pseudo-labelling: test patches whose ensemble probability (sigmoid of the mean
    # logit in work/stack/test_features.csv) is >= this or <= 1 - this join the labelled data (0 = off)
    pseudo_threshold: NonNeg = 0.0
    num_workers: Int = Field(2, ge=0)
    # "auto": bf16 on a GPU that supports it, except depthwise-conv families (EfficientNet, MobileNet,
    # ...) that ran slower in bf16 on an H100; off on CPU | "no" | "bf16" | "fp16"
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    channels_last: bool = False  # NHWC memory format for conv nets on GPUs
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    # where the torch augmentation backend keeps the training images:
    # "auto" (on the GPU when they fit in a third of its free memory, else pinned host memory) | "device" | "host"
    placement: Literal["auto", "device", "host"] = "auto"
    feature_views: Literal[1, 8] = 8  # heads on features: dihedral views embedded per patch
    # heads on features: K extra views of every labelled patch, each a random dihedral view with HED
    # stain jitter of this strength, so that heads learn stain invariance (test patches keep the 8 views)
    feature_hed_views: Int = Field(0, ge=0)
    feature_hed_sigma: NonNeg = 0.05
    # heads on features: patches per embedding forward (x views); 0 = fitted to free GPU memory (lowered
    # on out-of-memory), a small fixed batch on CPU
    embed_batch_size: Int = Field(0, ge=0)
    seed: Int = Field(0, ge=0)
    # stop when the held-out center's accuracy has not improved for this many epochs and keep the best epoch's
    # weights (0 = off). It reads the held-out center's labels to pick the epoch, so that center's out-of-fold
    # accuracy becomes optimistic - as in the published recipe that stopped on the validation center
    early_stop_patience: Int = Field(0, ge=0)
    eval_batch_size: Int = Field(256, ge=1)
    # experiment trackers, through Accelerate (`log_with`): any of TRACKERS, as a list or "a,b"; [] = JSON lines
    # only. Files go to the run folder's tracker/ (hosted trackers: their own servers too). Not part of what a
    # run is: a finished run is kept when only this changes
    log_with: Annotated[list[str], BeforeValidator(_names)] = []

    @model_validator(mode="after")
    def _pseudo(self):
        if self.pseudo_threshold and not 0.5 < self.pseudo_threshold < 1:
            raise ValueError(f"train.pseudo_threshold: expected 0 (off) or a value in (0.5, 1), got {self.pseudo_threshold}")
        return self


class StainGanCfg(Section):
    """MultiStain-CycleGAN (Hetz et al., MIDL 2023), trained by the `stain-gan` stage on the cache's unlabelled
    patches; used when aug.stain_norm is "gan". Any change here trains another generator (its own folder)."""
    # the center whose style the generator learns; None = the test split's center
    target_center: Int | None = Field(None, ge=0)
    # the centers whose grayscale patches it learns to colour; [] = every center of the cache (the MultiStain
    # generator); one center: the per-center CycleGAN variant (Caucheteux & Mirri), the same model on one source
    sources: list[Int] = []
    steps: Int = Field(2000, ge=1)
    batch_size: Int = Field(16, ge=2)
    lr: Float = Field(2e-4, gt=0)  # Adam (beta1 0.5, beta2 0.999) for both networks, as in CycleGAN
    gray_weight: NonNeg = 10.0  # the grayscale cycle: gray(G(gray(x))) = gray(x) on every source patch
    rgb_weight: NonNeg = 10.0  # the RGB cycle: G(gray(t)) = t on the target center's patches
    hed_sigma: NonNeg = 0.1  # colour augmentation of the generator's inputs before they are made grayscale
    channels: Int = Field(16, ge=4)  # the generator's first width (x2, x4 after its two down-samplings)
    blocks: Int = Field(4, ge=1)  # residual blocks at a quarter of the resolution
    checkpoint_every: Int = Field(200, ge=1)  # steps between resumable states
    seed: Int = Field(0, ge=0)


class Config(Section):
    # the run's folder name under work/runs/ and its name in the stack's tables: a plain name (letters,
    # digits, '.', '_', '-'; not starting with '.'), never a path
    name: Annotated[str, AfterValidator(_run_name)] = "experiment"
    model: ModelCfg = ModelCfg()
    algorithm: AlgorithmCfg = AlgorithmCfg()
    optim: OptimCfg = OptimCfg()
    aug: AugCfg = AugCfg()
    train: TrainCfg = TrainCfg()
    stain_gan: StainGanCfg = StainGanCfg()

    @model_validator(mode="after")
    def _consistent(self):
        m, a = self.model, self.algorithm
        if m.frozen and (a.consistency_weight or a.regen_weight):
            raise ValueError("algorithm.consistency_weight / regen_weight alter images: they need a fine-tuned "
                             "backbone, not a head on frozen features (model.frozen)")
        if not m.frozen and m.feature_shift != "none":
            raise ValueError("model.feature_shift: adapts a head on frozen features (model.frozen: true); a "
                             "fine-tuned backbone adapts its batch norms (infer --adabn)")
        if m.head != "mlp" and (not m.frozen or m.head_hidden or m.head_l1):
            raise ValueError(f"model.head={m.head}: a head on frozen features with its own fixed layers (model.frozen: true, "
                             "model.head_hidden: 0, model.head_l1: 0)")
        if m.self_train_rounds and not m.frozen:
            raise ValueError("model.self_train_rounds: self-trains a head on frozen features (model.frozen: true); a "
                             "fine-tuned backbone adapts its batch norms (infer --adabn)")
        if m.head_l1 > 0 and not (m.frozen and m.head_hidden == 0):
            raise ValueError("model.head_l1: the sparse head is a linear probe on frozen features (model.frozen: true, "
                             "model.head_hidden: 0)")
        if m.frozen and m.drop_path_rate > 0:
            raise ValueError("model.drop_path_rate: stochastic depth needs a fine-tuned backbone, not a head on "
                             "frozen features (model.frozen)")
        if m.recipe:
            fixed = [k for k in ("backbone", "input_size", "timm_kwargs") if getattr(m, k) != ModelCfg.model_fields[k].default]
            if fixed:
                raise ValueError(f"model.recipe={m.recipe} defines the backbone: leave model.{', model.'.join(fixed)} "
                                 "unset and override the recipe instead, e.g. model.recipe_overrides.input_size=224")
            if not (m.weights in ("hub", "none") or m.weights.startswith(("dir:", "file:"))):
                raise ValueError(f"model.weights: a recipe loads from hub | dir:PATH | file:PATH | none, got '{m.weights}'")
        elif m.recipe_overrides:
            raise ValueError("model.recipe_overrides: set model.recipe to the foundation model they modify")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()

    def identity(self) -> dict:
        """What makes a run this run: the resolved config without the settings that change only how it is
        watched (train.log_with) and, unless aug.stain_norm is gan, the stain GAN's (unused) settings."""
        out = self.model_dump()
        out["train"].pop("log_with")
        if self.aug.stain_norm != "gan":
            out.pop("stain_gan")
        return out

    def flat(self) -> dict:
        """The resolved config as flat `section.key` -> bool/int/float/str (a tracker's hyperparameters)."""
        def walk(node, prefix):
            for k, v in node.items():
                if isinstance(v, dict) and v:
                    yield from walk(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}", v if isinstance(v, (bool, int, float, str)) else str(v)
        return dict(walk(self.model_dump(), ""))


_MESSAGES = {  # pydantic error type -> our wording (the tests and users know these)
    "int_parsing": "expected int", "int_type": "expected int", "int_from_float": "expected an integer",
    "float_parsing": "expected float", "float_type": "expected float", "bool_parsing": "expected a boolean",
    "bool_type": "expected a boolean", "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping", "string_type": "expected a string",
}


def _line(error: dict) -> str:
    """One pydantic error as one line naming the key."""
    key = ".".join(str(p) for p in error["loc"])
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        section = _section_of(error["loc"][:-1])
        return f"unknown config key '{key}' (known: {', '.join(sorted(section.model_fields))})"
    if kind == "value_error":  # our own validators: the model-level ones name their keys already
        text = str(ctx.get("error", error["msg"]))
        return f"{key}: {text}" if key and key not in text else text
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value}"
    if kind in ("greater_than_equal", "less_than_equal"):
        op, bound = (">=", ctx["ge"]) if kind == "greater_than_equal" else ("<=", ctx["le"])
        return f"{key}: must be {op} {bound}, got {value}"
    if kind == "literal_error":
        return f"{key}: expected {ctx.get('expected')}, got {value!r}"
    return f"{key}: {_MESSAGES.get(kind, error['msg'])}, got {value!r}"


def _section_of(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        model = typing.get_type_hints(model)[part]
    return model


def validated(data: dict) -> Config:
    """A Config from a mapping, or ConfigError with the first problem (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_line(e.errors()[0])) from None


def merge(base: dict, update: dict) -> dict:
    """`update` merged into `base`: mappings (sections, recipe_overrides, timm_kwargs) key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': 3e-4}} (values parsed as YAML scalars, then typed by the fields)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not a valid YAML scalar") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
        try:
            validated(data)  # the file alone first: its errors name the file
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        data.setdefault("name", path.stem)
    for ov in overrides:
        data = merge(data, parse_override(ov))
    return validated(data)


def save_config(cfg: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
