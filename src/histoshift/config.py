"""Typed experiment configuration: one YAML file per experiment plus `key.sub=value` overrides.

Every field has a type and a default. Loading a YAML file or applying an override with a key that
does not exist raises `ConfigError` naming the key, so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a config file or override."""


@dataclass
class ModelCfg:
    backbone: str = "tf_efficientnet_lite0"  # any timm name, including "hf-hub:org/name"
    # "none" | "timm" (timm's own pretrained source: HF hub or URL) | "file:PATH" | "package:NAME";
    # with a recipe: "hub" (the Hugging Face hub or its local cache) | "dir:PATH" (a downloaded copy of
    # the hub repo, e.g. a Kaggle dataset) | "file:PATH" (a weights file)
    weights: str = "none"
    # a pathology foundation model by name (histoshift.models.foundation.RECIPES): the recipe states the
    # card's backbone, input size, interpolation, mean/std, embedding rule and precision; `backbone`,
    # `input_size` and `timm_kwargs` are then left alone and any recipe field is overridden here
    recipe: str = ""
    recipe_overrides: dict = field(default_factory=dict)
    input_size: int = 96  # side the backbone sees; batches are resized on the device when it differs
    # extra keyword arguments for timm.create_model (hub foundation models need some); values of
    # keys ending in "_layer" may name a class, e.g. "torch.nn.SiLU" or "timm.layers.SwiGLUPacked"
    timm_kwargs: dict = field(default_factory=dict)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    frozen: bool = False  # True: embed once with the frozen backbone, train only a head on the features
    train_last_blocks: int = -1  # partial fine-tuning: train only the last N block groups (-1 = all)
    head_hidden: int = 0  # frozen heads: 0 = linear probe, > 0 = MLP with this hidden width


@dataclass
class AlgorithmCfg:
    name: str = "dann"  # a key of histoshift.algorithms.ALGORITHMS
    domain_weight: float = 0.1  # weight of the domain loss in the total loss
    domain_hidden: int = 256  # width of the domain head's hidden layer
    grl_max: float = 1.0  # the Ganin schedule rises from 0 to this coefficient
    domain_loss: str = "ce"  # "ce" (cross-entropy) | "ls" (least squares on the softmax, LSGAN style)
    focal_gamma: float = 0.0  # focal loss exponent for the tumour loss (0 = plain BCE)
    entropy_weight: float = 0.0  # entropy minimisation on the unlabelled target centers (0 = off)
    # Stain-AgLr (DART 2022) as two switches for any algorithm; each image of a step also goes through
    # the model as a copy with HED stain alteration of strength `alter_sigma`
    consistency_weight: float = 0.0  # KL between the predictions for an image and for its altered copy
    regen_weight: float = 0.0  # a small decoder rebuilds the image (at regen_size px) from the copy's features
    alter_sigma: float = 0.1  # HED alteration of the copy: scale U(1-s, 1+s), shift U(-s, s) per channel
    regen_size: int = 32  # side of the rebuilt image (the image average-pooled to it)


@dataclass
class OptimCfg:
    lr: float = 1e-3  # classifier head
    backbone_lr: float = 3e-4
    domain_lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.1  # share of steps with linear warm-up, then cosine decay to zero
    grad_clip: float = 1.0


@dataclass
class AugCfg:
    backend: str = "torch"  # "torch" (whole batches on the device) | "albumentations" (per item, CPU workers)
    dihedral: bool = True  # random flips and 90-degree rotations (the 8 dihedral views)
    hed_sigma: float = 0.03  # HED stain jitter: scale ~ U(1-s, 1+s), shift ~ U(-s, s) per channel
    brightness: float = 0.1  # brightness/contrast jitter amplitude (0 = off)
    contrast: float = 0.1
    stain_norm: str = "none"  # "none" | "reinhard" | "macenko": per-patch normalisation, train and inference


@dataclass
class TrainCfg:
    epochs: int = 3
    batch_size: int = 64
    target_batch_size: int = 32  # unlabelled images per step for the domain head (DANN)
    steps_per_epoch: int = 0  # 0 = one pass over the labelled training patches
    probe_epochs: int = 0  # linear probe first: the backbone's learning rate is 0 for these epochs
    # one round of pseudo-labelling: test patches whose ensemble probability (sigmoid of the mean
    # logit in work/stack/test_features.csv) is >= this or <= 1 - this join the labelled data (0 = off)
    pseudo_threshold: float = 0.0
    num_workers: int = 2
    # "auto": bf16 on a GPU that supports it, except depthwise-conv families (EfficientNet, MobileNet,
    # ...) that ran slower in bf16 on an H100; off on CPU | "no" | "bf16" | "fp16"
    precision: str = "auto"
    channels_last: bool = False  # NHWC memory format for conv nets on GPUs
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    # where the torch augmentation backend keeps the training images:
    # "auto" (on the GPU when they fit in a third of its free memory, else pinned host memory) | "device" | "host"
    placement: str = "auto"
    feature_views: int = 8  # frozen backbones: dihedral views embedded per patch (1 or 8)
    # frozen backbones: K extra views of every labelled patch, each a random dihedral view with HED
    # stain jitter of this strength, so that heads learn stain invariance (test patches keep the 8 views)
    feature_hed_views: int = 0
    feature_hed_sigma: float = 0.05
    # frozen backbones: patches per embedding forward (x views); 0 = fitted to free GPU memory (halved
    # on out-of-memory), a small fixed batch on CPU
    embed_batch_size: int = 0
    seed: int = 0
    eval_batch_size: int = 256


@dataclass
class Config:
    name: str = "experiment"
    model: ModelCfg = field(default_factory=ModelCfg)
    algorithm: AlgorithmCfg = field(default_factory=AlgorithmCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cast(value, typ, key: str):
    """Cast a YAML or command-line value to the declared type of field `key`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {typ.__name__}, got boolean {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # mappings merge: an override adds keys
            setattr(obj, key, {**current, **_cast(value, dict, full)})
        else:
            setattr(obj, key, _cast(value, hints[key], full))


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': 3e-4}} (values parsed as YAML scalars, then cast by type)."""
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
    cfg = Config()
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
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if "name" not in data:
            cfg.name = path.stem
    for ov in overrides:
        _apply(cfg, parse_override(ov))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    from .algorithms import ALGORITHMS  # late import: algorithms import torch

    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: unknown algorithm '{cfg.algorithm.name}' (known: {sorted(ALGORITHMS)})")
    if cfg.algorithm.domain_loss not in ("ce", "ls"):
        raise ConfigError(f"algorithm.domain_loss: expected ce or ls, got '{cfg.algorithm.domain_loss}'")
    if cfg.aug.backend not in ("albumentations", "torch"):
        raise ConfigError(f"aug.backend: expected 'albumentations' or 'torch', got '{cfg.aug.backend}'")
    if cfg.aug.stain_norm not in ("none", "reinhard", "macenko"):
        raise ConfigError(f"aug.stain_norm: expected none|reinhard|macenko, got '{cfg.aug.stain_norm}'")
    if cfg.train.precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"train.precision: expected auto|no|bf16|fp16, got '{cfg.train.precision}'")
    if cfg.train.placement not in ("auto", "device", "host"):
        raise ConfigError(f"train.placement: expected auto|device|host, got '{cfg.train.placement}'")
    if cfg.train.pseudo_threshold and not 0.5 < cfg.train.pseudo_threshold < 1:
        raise ConfigError(f"train.pseudo_threshold: expected 0 (off) or a value in (0.5, 1), got {cfg.train.pseudo_threshold}")
    if cfg.train.feature_views not in (1, 8):
        raise ConfigError(f"train.feature_views: expected 1 or 8, got {cfg.train.feature_views}")
    _validate_numbers(cfg)
    if cfg.model.input_size < 32:
        raise ConfigError(f"model.input_size: {cfg.model.input_size} is too small")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1")
    if cfg.train.feature_hed_views < 0 or cfg.train.embed_batch_size < 0:
        raise ConfigError("train.feature_hed_views and train.embed_batch_size must be >= 0")
    if cfg.algorithm.regen_size not in (8, 16, 32, 64):
        raise ConfigError(f"algorithm.regen_size: expected 8, 16, 32 or 64, got {cfg.algorithm.regen_size}")
    if cfg.model.frozen and (cfg.algorithm.consistency_weight or cfg.algorithm.regen_weight):
        raise ConfigError("algorithm.consistency_weight / regen_weight alter images: they need a fine-tuned "
                          "backbone, not a head on frozen features (model.frozen)")
    if cfg.model.recipe:
        _validate_recipe(cfg.model)
    elif cfg.model.recipe_overrides:
        raise ConfigError("model.recipe_overrides: set model.recipe to the foundation model they modify")


# (section, key): the smallest value allowed (every float must also be finite)
MINIMUM = {("optim", "lr"): 0.0, ("optim", "backbone_lr"): 0.0, ("optim", "domain_lr"): 0.0,
           ("optim", "weight_decay"): 0.0, ("optim", "grad_clip"): 0.0, ("algorithm", "domain_weight"): 0.0,
           ("algorithm", "focal_gamma"): 0.0, ("algorithm", "entropy_weight"): 0.0, ("algorithm", "grl_max"): 0.0,
           ("algorithm", "consistency_weight"): 0.0, ("algorithm", "regen_weight"): 0.0,
           ("algorithm", "alter_sigma"): 0.0, ("algorithm", "regen_size"): 8,
           ("algorithm", "domain_hidden"): 1, ("aug", "hed_sigma"): 0.0, ("aug", "brightness"): 0.0,
           ("aug", "contrast"): 0.0, ("model", "drop_rate"): 0.0, ("model", "drop_path_rate"): 0.0,
           ("model", "head_hidden"): 0, ("train", "target_batch_size"): 1, ("train", "steps_per_epoch"): 0,
           ("train", "probe_epochs"): 0, ("train", "num_workers"): 0, ("train", "feature_hed_sigma"): 0.0}
MAXIMUM = {("optim", "warmup_frac"): 1.0, ("model", "drop_rate"): 1.0, ("model", "drop_path_rate"): 1.0}


def _validate_numbers(cfg: Config) -> None:
    """Every float finite; counts, rates and probabilities in their ranges (a NaN learning rate or a
    negative step count must stop here, not hours later or never)."""
    for section in ("model", "algorithm", "optim", "aug", "train"):
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name}: must be a finite number, got {value}")
            low = MINIMUM.get((section, f.name), 0.0 if f.name == "warmup_frac" else None)
            if low is not None and value < low:
                raise ConfigError(f"{section}.{f.name}: must be >= {low}, got {value}")
            high = MAXIMUM.get((section, f.name))
            if high is not None and value > high:
                raise ConfigError(f"{section}.{f.name}: must be <= {high}, got {value}")


def _validate_recipe(m: ModelCfg) -> None:
    from .models.foundation import RecipeError, resolve_recipe  # late import: the registry imports torch

    defaults = ModelCfg()
    fixed = [k for k in ("backbone", "input_size", "timm_kwargs") if getattr(m, k) != getattr(defaults, k)]
    if fixed:
        raise ConfigError(f"model.recipe={m.recipe} defines the backbone: leave model.{', model.'.join(fixed)} unset "
                          f"and override the recipe instead, e.g. model.recipe_overrides.input_size=224")
    if not (m.weights in ("hub", "none") or m.weights.startswith(("dir:", "file:"))):
        raise ConfigError(f"model.weights: a recipe loads from hub | dir:PATH | file:PATH | none, got '{m.weights}'")
    try:
        resolve_recipe(m.recipe, m.recipe_overrides)
    except RecipeError as e:
        raise ConfigError(f"model.recipe: {e}") from None


def save_config(cfg: Config, path: Path) -> None:
    from .safeio import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
