"""The `stain-gan` stage: a learned stain normalisation, MultiStain-CycleGAN (Hetz et al., MIDL 2023).

One generator G colours a grayscale, colour-augmented patch in the target center's style. Its cycle
partner is the fixed grayscale conversion (no second generator), so the cycle has two halves:
  grayscale cycle  gray(G(gray(aug(x)))) = gray(aug(x))  on source patches: the structure is kept
  RGB cycle        G(gray(aug(t))) = t                   on target patches: the target's colours are learned
and a PatchGAN discriminator (least-squares GAN loss, as CycleGAN) tells generated patches from real target
ones. The colour augmentation before the grayscale makes G's output independent of the input's stain, which
is the point: every patch, whatever its center, is coloured the same way. `stain_gan.sources: [c]` trains the
same model on one source center (the per-center CycleGAN variant of Caucheteux & Mirri). Not built:
CycleGAN's history buffer of generated images (the discriminator sees the current batch only).

`aug.stain_norm: gan` applies G to whole batches on the device at training and inference (`attach`); a run
records the generator's digest, so a generator trained again makes the runs trained with the old one refuse.

Folder work/stain_gan/<key>/ (key: the cache id, target, sources and every setting that changes the
generator; a changed cache or setting trains another): generator.safetensors, losses.csv, samples.png and
meta.json (written last: the spec, the generator's digest, steps, seconds); state-step<N>/ while training
(a killed run resumes from its last saved step; checkpoint.py, nothing unpickled).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import last_state, load_state, save_state
from .config import Config, ConfigError
from .data.augment import brightness_contrast, luma, random_dihedral
from .data.cache import Cache
from .data.hed import random_hed
from .lineage import StaleError, digest_file
from .paths import Paths
from .progress import bar
from .safeio import Lock, atomic, write_csv, write_figure, write_json

GENERATOR = "generator.safetensors"
META = "meta.json"
AGAIN = "stain-gan --force trains it again"
RECORD_EVERY = 50  # steps per line of losses.csv


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


def gan_spec(cfg: Config, cache: Cache) -> dict:
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


def gan_folder(cfg: Config, cache: Cache, paths: Paths) -> tuple[dict, Path]:
    spec = gan_spec(cfg, cache)
    return spec, paths.stain_gan / gan_key(spec)


def _batch(cache: Cache, rows: pd.DataFrame, n: int, rng: np.random.Generator, device) -> torch.Tensor:
    """n random patches of `rows` (distinct when there are enough) as float B x 3 x H x W in [0, 1] on the device
    (sorted: sequential reads)."""
    pick = rows.iloc[np.sort(rng.choice(len(rows), n, replace=len(rows) < n))]
    return torch.from_numpy(cache.gather(pick)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _colour_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The generator's input augmentation: HED stain jitter, then brightness and contrast (then it sees gray)."""
    if sigma > 0:
        x = random_hed(x, sigma, generator)
    return brightness_contrast(x, 0.1, 0.1, generator)


def train_stain_gan(cfg: Config, cache: Cache, paths: Paths, force: bool = False, accelerator=None) -> Path:
    """Train (or resume, or keep) the generator of `cfg.stain_gan` on `cache`; returns its folder."""
    from accelerate import Accelerator

    spec, folder = gan_folder(cfg, cache, paths)
    acc = accelerator or Accelerator(mixed_precision="no")  # GAN losses in full precision
    if (folder / META).exists() and not force:
        acc.print(f"stain-gan: {folder} is trained for this cache and these settings, keeping it")
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # one process trains a generator at a time (the lock dies with its holder); under `accelerate launch` the
    # main process holds it for all
    lock = Lock(folder.parent / f".{folder.name}.lock", f"the stain GAN {folder}") if acc.is_main_process else nullcontext()
    with lock:
        if force and (folder / META).exists() and acc.is_main_process:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"stain-gan: moved the previous generator to {aside}")
        acc.wait_for_everyone()
        folder.mkdir(exist_ok=True)
        _fit(cfg, cache, spec, folder, acc)
    return folder


def _fit(cfg: Config, cache: Cache, spec: dict, folder: Path, acc) -> None:
    g = cfg.stain_gan
    torch.manual_seed(g.seed)
    gen, disc = Generator(g.channels, g.blocks), PatchDiscriminator(2 * g.channels)
    opt_g = torch.optim.Adam(gen.parameters(), lr=g.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=g.lr, betas=(0.5, 0.999))
    gen, disc, opt_g, opt_d = acc.prepare(gen, disc, opt_g, opt_d)
    index = cache.index
    sources = index[index["center"].isin(spec["sources"])]
    target = index[index["center"] == spec["target"]]
    start, seconds, records = 0, 0.0, []
    state = last_state(folder, "state-step")
    if state is not None:
        loop = load_state(acc, state, AGAIN)
        start, seconds, records = loop["step"], loop["seconds"], loop["records"]
        acc.print(f"stain-gan: resuming {folder.name} after step {start} of {g.steps}")
    nbytes = 4 * sum(p.numel() * p.element_size() for m in (gen, disc) for p in m.parameters())
    t0, logs = time.time() - seconds, {}
    steps = bar(range(start, g.steps), main=acc.is_local_main_process, unit="step", desc=f"stain-gan {folder.name}",
                initial=start, total=g.steps)
    for step in steps:
        # the batches and the jitter are a function of (seed, step, process): a resumed run sees the same ones
        rng = np.random.default_rng([g.seed, step, acc.process_index])
        jitter = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        lr = g.lr * min(1.0, 2.0 * (1.0 - step / g.steps))  # constant, then linear decay over the second half
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        x = random_dihedral(_batch(cache, sources, g.batch_size, rng, acc.device), jitter)
        t = random_dihedral(_batch(cache, target, g.batch_size, rng, acc.device), jitter)
        x_in, t_in = _colour_jitter(x, g.hed_sigma, jitter), _colour_jitter(t, g.hed_sigma, jitter)
        fake, rebuilt = gen(x_in), gen(t_in)
        score = disc(fake)
        losses = {"adv": F.mse_loss(score, torch.ones_like(score)),
                  "gray": F.l1_loss(luma(fake), luma(x_in)), "rgb": F.l1_loss(rebuilt, t)}
        loss_g = losses["adv"] + g.gray_weight * losses["gray"] + g.rgb_weight * losses["rgb"]
        opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        opt_g.step()
        real, made = disc(t), disc(fake.detach())
        losses["disc"] = 0.5 * (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(made, torch.zeros_like(made)))
        opt_d.zero_grad(set_to_none=True)
        acc.backward(losses["disc"])
        opt_d.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not all(np.isfinite(list(values.values()))):
            raise StaleError(f"{folder}: the stain GAN's losses became non-finite at step {step + 1} ({values}); "
                             "lower stain_gan.lr")
        for k, v in values.items():
            logs.setdefault(k, []).append(v)
        steps.set_postfix(gray=f"{values['gray']:.3f}", rgb=f"{values['rgb']:.3f}", disc=f"{values['disc']:.3f}")
        done = step + 1
        if done % RECORD_EVERY == 0 or done == g.steps:
            records.append({"step": done, "seconds": round(time.time() - t0, 1),
                            **{k: round(float(np.mean(v)), 5) for k, v in logs.items()}})
            logs = {}
        if done % g.checkpoint_every == 0 and done < g.steps:
            save_state(acc, folder / f"state-step{done}", {"step": done, "seconds": time.time() - t0, "records": records},
                       nbytes, f"saving the stain GAN state at step {done}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(acc.unwrap_model(gen), cache, spec, folder, records, time.time() - t0, g.steps)
    acc.wait_for_everyone()


def _finish(gen: Generator, cache: Cache, spec: dict, folder: Path, records: list, seconds: float, steps: int) -> None:
    from safetensors.torch import save_file

    with atomic(folder / GENERATOR) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in gen.state_dict().items()}, str(tmp))
    write_csv(folder / "losses.csv", pd.DataFrame(records), index=False)
    _plot_samples(gen, cache, spec, folder / "samples.png")
    write_json(folder / META, {"spec": spec, "key": folder.name, "generator": digest_file(folder / GENERATOR),
                               "steps": steps, "seconds": round(seconds, 1), "final": records[-1] if records else {}})
    for old in folder.glob("state-step*"):
        shutil.rmtree(old, ignore_errors=True)
    print(f"stain-gan: generator in {folder / GENERATOR} ({steps} steps, {seconds:.0f} s); samples: {folder / 'samples.png'}")


@torch.no_grad()
def _plot_samples(gen: Generator, cache: Cache, spec: dict, path: Path, per_center: int = 4) -> None:
    """Rows: a few patches of each center, as stored and as the generator colours them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, rng = cache.index, np.random.default_rng(0)
    centers = sorted(int(c) for c in index["center"].unique())
    fig, axes = plt.subplots(2 * len(centers), per_center, figsize=(1.6 * per_center, 3.2 * len(centers)), squeeze=False)
    device = next(gen.parameters()).device
    for i, c in enumerate(centers):
        x = _batch(cache, index[index["center"] == c], per_center, rng, device)
        out = gen.eval()(x)
        for j in range(per_center):
            for r, img in ((2 * i, x[j]), (2 * i + 1, out[j])):
                axes[r, j].imshow(img.permute(1, 2, 0).cpu().numpy())
                axes[r, j].set_xticks([])
                axes[r, j].set_yticks([])
        axes[2 * i, 0].set_ylabel(f"center {c}", fontsize=8)
        axes[2 * i + 1, 0].set_ylabel(f"-> style {spec['target']}", fontsize=8)
    fig.suptitle(f"{path.parent.name}: patches and the generator's colouring", fontsize=9)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)


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


def _trained(cfg: Config, cache: Cache, paths: Paths) -> tuple[Path, dict]:
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


def identity(cfg: Config, cache: Cache, paths: Paths) -> str:
    """What identifies the generator a config uses (Colourizer.identity): the attached one's, else read from its
    folder without loading it (preflight)."""
    if cfg.aug.colourizer is not None:
        return cfg.aug.colourizer.identity
    folder, meta = _trained(cfg, cache, paths)
    return _identity(folder.name, meta["generator"])


def _identity(key: str, digest: str) -> str:
    """What a run or a feature store records of a generator: its folder and digest."""
    return f"{key}:{digest}"


def load_colourizer(cfg: Config, cache: Cache, paths: Paths, device="cpu") -> Colourizer:
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


def attach(cfg: Config, cache: Cache, paths: Paths, device="cpu") -> dict:
    """For aug.stain_norm: gan, load the generator and attach it to cfg.aug (every to_float / augment_batch of
    this config then applies it); returns what a run records of it ({} for any other setting)."""
    if cfg.aug.stain_norm != "gan":
        return {}
    colourizer = load_colourizer(cfg, cache, paths, device)
    cfg.aug.attach_colourizer(colourizer)
    return {"stain_gan": colourizer.identity}
