"""The sections every kind of model shares: the algorithm, the optimizer, the augmentation, the training loop and
the stain GAN. Each field has its type, default and range next to it."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from .base import Float, Int, NonNeg, Section, names

ALGORITHM_NAMES = (
    "erm",
    "dann",
    "lntl",
    "tabe",
    "clgr",
    "aiva",
    "dann_aiva",
)  # the keys of histoshift.algorithms.ALGORITHMS (a test keeps them equal)
EXTRA_OPTIMIZERS = ("nero", "avagrad")  # not in timm: taken from pytorch-optimizer (engine.build_optimizer)


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
    # lntl: weight of the bias prediction's negative entropy; tabe, clgr: of the confusion loss (algorithms/debias.py)
    debias_weight: NonNeg = 0.1
    # aiva, dann_aiva (algorithms/aiva.py): once an epoch, k-means of the source and of the target features in their
    # joint principal components, clusters matched by the Hungarian method; the loss pulls target clusters' batch means
    aiva_weight: NonNeg = 0.1
    aiva_clusters: Int = Field(8, ge=1)
    aiva_dims: Int = Field(32, ge=1)  # principal components the clusters live in
    aiva_samples: Int = Field(2048, ge=2)  # labelled (and as many unlabelled) patches embedded each epoch
    # Stain-AgLr (DART 2022) as two switches for any algorithm on images (model.kind: image); each image of a step
    # also goes through the model as a copy with HED stain alteration of strength `alter_sigma`
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

    @property
    def alters_images(self) -> bool:
        """Stain-AgLr's switches: they need images to alter (a fine-tuned backbone)."""
        return bool(self.consistency_weight or self.regen_weight)


def optimizer_names() -> list[str]:
    """What `optim.name` takes: every optimizer timm's factory builds, Nero and AvaGrad (from pytorch-optimizer)."""
    from timm.optim import list_optimizers

    return sorted({*list_optimizers(), *EXTRA_OPTIMIZERS})


class OptimCfg(Section):
    # a name of timm's optimizer factory (adamw, sgd, lamb, lars, adabelief, lion, ...), nero or avagrad; every
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
    # "torch" (whole batches on the device) | "albumentations" (per item, CPU workers); both apply the colour
    # steps in one order (stain/transform.py: normalise -> jitter -> grayscale)
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
    seed: Int = Field(0, ge=0)
    # stop when the held-out center's accuracy has not improved for this many epochs and keep the best epoch's
    # weights (0 = off). This READS THE HELD-OUT CENTER'S LABELS to pick the epoch, so that center's out-of-fold
    # accuracy becomes optimistic - as in the published recipe that stopped on the validation center; the stack's
    # choice records which members did (`heldout_selected`)
    early_stop_patience: Int = Field(0, ge=0)
    # weight averaging (averaging.py): "none" | "ema" (every step, decay ema_decay) | "swa" (the uniform mean of every
    # step from average_start, a share of the steps, on) | "swad" (the dense mean over the epochs around the lowest
    # held-out loss, within swad_tolerance x it: READS THE HELD-OUT CENTER'S LABELS, as early stopping does).
    # Predictions, TTA and AdaBN use the averaged weights (batch norm recomputed for them)
    average: Literal["none", "ema", "swa", "swad"] = "none"
    ema_decay: Float = Field(0.999, gt=0, lt=1)  # reached through timm's warm-up ramp (1 - (1 + step)^-0.75)
    average_start: Float = Field(0.5, ge=0, lt=1)
    swad_tolerance: Float = Field(1.3, ge=1)  # SWAD's tolerance ratio r
    eval_batch_size: Int = Field(256, ge=1)
    # experiment trackers, through Accelerate (`log_with`): any of TRACKERS, as a list or "a,b"; [] = JSON lines
    # only. Files go to the run folder's tracker/ (hosted trackers: their own servers too). Not part of what a
    # run is: a finished run is kept when only this changes
    log_with: Annotated[list[str], BeforeValidator(names)] = []

    @model_validator(mode="after")
    def _pseudo(self):
        if self.pseudo_threshold and not 0.5 < self.pseudo_threshold < 1:
            raise ValueError(
                f"train.pseudo_threshold: expected 0 (off) or a value in (0.5, 1), got {self.pseudo_threshold}"
            )
        if self.early_stop_patience and self.average != "none":
            raise ValueError(f"train.average={self.average} with train.early_stop_patience: choose one (an average of "
                             "weights and one picked epoch are two answers to the same question)")
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
