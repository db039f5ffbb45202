"""The stain GAN of `aug.stain_norm: gan`: MultiStain-CycleGAN (Hetz et al., MIDL 2023), the model, its folder
and its use; the `stain-gan` stage (stages/stain_gan.py) trains it.

One generator G colours a grayscale, colour-augmented patch in the target center's style. Its cycle
partner is the fixed grayscale conversion (no second generator), so the cycle has two halves:
  grayscale cycle  gray(G(gray(aug(x)))) = gray(aug(x))  on source patches: the structure is kept
  RGB cycle        G(gray(aug(t))) = t                   on target patches: the target's colours are learned
and a PatchGAN discriminator (least-squares GAN loss, as CycleGAN) tells generated patches from real target
ones. The colour augmentation before the grayscale makes G's output independent of the input's stain, which
is the point: every patch, whatever its center, is coloured the same way. `stain_gan.sources: [c]` trains the
same model on one source center (the per-center CycleGAN variant of Caucheteux & Mirri). Not built:
CycleGAN's history buffer of generated images (the discriminator sees the current batch only).

The task loads the trained G (`load_colourizer`) and hands it to its InputTransform (transform.py), which
applies it to whole batches on the device at training and inference; a run records the generator's identity,
so a generator trained again makes the runs trained with the old one refuse.

Folder work/stain_gan/<key>/ (key: the cache id, target, sources and every setting that changes the
generator; a changed cache or setting trains another): generator.safetensors, losses.csv, samples.png and
meta.json (written last: the spec, the generator's digest, steps, seconds). `cache` arguments here are the
data layer's Cache (read for its centers and id only; this package sits below the data layer).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..lineage import StaleError, digest_file
from ..paths import Paths
from .jitter import luma

GENERATOR = "generator.safetensors"
META = "meta.json"
AGAIN = "stain-gan --force trains it again"


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """CycleGAN's ResNet generator (Johnson et al. 2016) with one input channel: RGB in [0, 1] -> its luma ->
    RGB in [0, 1]. Two stride-2 convolutions down, `blocks` residual blocks, nearest up-sampling + convolution
    up (no transposed convolutions: no checkerboard), instance norm throughout (no running statistics, so
    training and inference compute the same function)."""

    def __init__(self, channels: int = 16, blocks: int = 4):
        super().__init__()
        c = channels

        def conv(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.InstanceNorm2d(cout), nn.ReLU(True)]

        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(1, c, 7), nn.InstanceNorm2d(c), nn.ReLU(True),
            *conv(c, 2 * c, 2), *conv(2 * c, 4 * c, 2),
            *[_Residual(4 * c) for _ in range(blocks)],
            nn.Upsample(scale_factor=2), *conv(4 * c, 2 * c), nn.Upsample(scale_factor=2), *conv(2 * c, c),
            nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        out = self.net(luma(rgb) * 2 - 1)
        if out.shape[-2:] != rgb.shape[-2:]:  # sides not divisible by 4
            out = F.interpolate(out, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(out)


class PatchDiscriminator(nn.Module):
    """CycleGAN's PatchGAN (3 layers): one real/fake score per overlapping receptive field."""

    def __init__(self, channels: int = 32):
        super().__init__()
        d = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, d, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(d, 2 * d, 4, 2, 1), nn.InstanceNorm2d(2 * d), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * d, 4 * d, 4, 1, 1), nn.InstanceNorm2d(4 * d), nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * d, 1, 4, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.net(rgb * 2 - 1)


def gan_spec(cfg: Config, cache) -> dict:
    """Everything the generator depends on (its folder's key hashes it); the target and sources resolved
    against the cache's centers (a center it does not hold is one line)."""
    g = cfg.stain_gan
    index = cache.index
    centers = sorted(int(c) for c in index["center"].unique())
    target = g.target_center
    if target is None:
        test = sorted(int(c) for c in index.loc[index["split"] == "test", "center"].unique())
        if len(test) != 1:
            raise ConfigError(f"stain_gan.target_center: the test split holds centers {test}; name the one to learn")
        target = test[0]
    unknown = sorted({target, *g.sources} - set(centers))
    if unknown:
        raise ConfigError(f"stain_gan: center(s) {unknown} are not in the cache (centers {centers})")
    settings = g.model_dump(exclude={"target_center", "sources", "checkpoint_every"})
    return {"cache": cache.id, "target": target, "sources": sorted(set(g.sources)) or centers, "settings": settings}


def gan_key(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    sources = spec["sources"]
    kind = f"cyclegan-{sources[0]}" if len(sources) == 1 else "multistain"
    return f"{kind}-to{spec['target']}-{digest}"


def gan_folder(cfg: Config, cache, paths: Paths) -> tuple[dict, Path]:
    spec = gan_spec(cfg, cache)
    return spec, paths.stain_gan / gan_key(spec)


class Colourizer:
    """The trained generator as a batch transform on the device (aug.stain_norm: gan): float B x 3 x H x W in
    [0, 1] -> the same, in the target center's style; no gradients, eval chunks of 512 patches."""

    def __init__(self, generator: Generator, digest: str, key: str):
        self.generator, self.digest, self.key = generator.eval(), digest, key

    @property
    def identity(self) -> str:
        return _identity(self.key, self.digest)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gen = self.generator
        if next(gen.parameters()).device != x.device:
            gen.to(x.device)
        return torch.cat([gen(x[i:i + 512].float()) for i in range(0, len(x), 512)]).to(x.dtype)


def _trained(cfg: Config, cache, paths: Paths) -> tuple[Path, dict]:
    """The folder and meta.json of the finished generator of `cfg.stain_gan` for this cache, its file checked
    against the recorded digest (one line when it is missing, unfinished or replaced since)."""
    _, folder = gan_folder(cfg, cache, paths)
    if not (folder / META).exists():
        raise StaleError(f"aug.stain_norm=gan: no stain GAN trained for this cache and these stain_gan settings "
                         f"({folder} is missing or unfinished); run `histoshift stain-gan --config <this config>` "
                         "first (train.sh does)")
    meta = json.loads((folder / META).read_text())
    if not (folder / GENERATOR).is_file() or digest_file(folder / GENERATOR) != meta.get("generator"):
        raise StaleError(f"{folder / GENERATOR}: missing or not the generator recorded in {META} (replaced since); "
                         f"{AGAIN}")
    return folder, meta


def identity(cfg: Config, cache, paths: Paths) -> str:
    """What identifies the generator a config uses (Colourizer.identity), read from its folder without loading it."""
    folder, meta = _trained(cfg, cache, paths)
    return _identity(folder.name, meta["generator"])


def _identity(key: str, digest: str) -> str:
    """What a run or a feature store records of a generator: its folder and digest."""
    return f"{key}:{digest}"


def load_colourizer(cfg: Config, cache, paths: Paths, device="cpu") -> Colourizer:
    """The generator of `cfg.stain_gan` for this cache, ready to colour batches on `device`."""
    from safetensors.torch import load_file

    folder, meta = _trained(cfg, cache, paths)
    g = cfg.stain_gan
    gen = Generator(g.channels, g.blocks)
    try:
        gen.load_state_dict(load_file(str(folder / GENERATOR)))
    except (RuntimeError, OSError) as e:
        raise StaleError(f"{folder / GENERATOR}: not a generator of these settings ({str(e).splitlines()[0]}); "
                         f"{AGAIN}") from None
    return Colourizer(gen.to(device), meta["generator"], folder.name)
