"""Stage `stain-gan`: train the stain GAN of a config with aug.stain_norm: gan (the model and its use: stain/gan.py).

Losses per step: least-squares adversarial + gray_weight x grayscale cycle + rgb_weight x RGB cycle for the
generator, least squares for the PatchGAN; Adam (0.5, 0.999), the learning rate constant then linearly to zero
over the second half. The batches and the jitter are a function of (seed, step, process), so a killed run resumes
(state-step<N>/, checkpoint.py: nothing unpickled) to the bit-identical generator. A non-finite loss stops it with
the engine's rule (errors.NonFiniteError): nothing is marked trained.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import Stage, config_arguments, experiment, timed

STAGE = Stage("train the stain-normalising generator of a config with aug.stain_norm: gan (MultiStain-CycleGAN "
              "on the cache's unlabelled patches, towards stain_gan.target_center; resumes a killed run; any "
              "other config has nothing to train)",
              "--config YAML, work/cache/",
              "work/stain_gan/<key>/: generator.safetensors, meta.json, losses.csv, samples.png (key: the "
              "cache and every stain_gan setting)",
              flow="configs/*.yaml, work/cache/ -> work/stain_gan/<key>/")
RECORD_EVERY = 50  # steps per line of losses.csv


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="train again (the previous generator is kept aside)")
    config_arguments(p, "stain_gan.steps=500 stain_gan.sources=[0]")


def run(a, paths) -> None:
    from ..data.cache import Cache, check_inputs

    cfg = experiment(a)
    if cfg.aug.stain_norm != "gan":
        print(f"stain-gan: {cfg.name} does not use aug.stain_norm=gan: nothing to train")
        return
    check_inputs(paths.input, paths.cache)
    timed("stain-gan", train_stain_gan, cfg, Cache.open(paths.cache), paths, force=a.force)


def _batch(cache, rows, n: int, rng, device):
    """n random patches of `rows` (distinct when there are enough) as float B x 3 x H x W in [0, 1] on the device
    (sorted: sequential reads)."""
    import numpy as np
    import torch

    pick = rows.iloc[np.sort(rng.choice(len(rows), n, replace=len(rows) < n))]
    return torch.from_numpy(cache.gather(pick)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _colour_jitter(x, sigma: float, generator):
    """The generator's input augmentation: HED stain jitter, then brightness and contrast (then it sees gray)."""
    from ..stain.hed import random_hed
    from ..stain.jitter import brightness_contrast

    if sigma > 0:
        x = random_hed(x, sigma, generator)
    return brightness_contrast(x, 0.1, 0.1, generator)


def train_stain_gan(cfg, cache, paths, force: bool = False, accelerator=None) -> Path:
    """Train (or resume, or keep) the generator of `cfg.stain_gan` on `cache`; returns its folder."""
    from accelerate import Accelerator

    from ..checkpoint import exclusive_folder
    from ..stain.gan import META, gan_folder

    spec, folder = gan_folder(cfg, cache, paths)
    acc = accelerator or Accelerator(mixed_precision="no")  # GAN losses in full precision
    if (folder / META).exists() and not force:
        acc.print(f"stain-gan: {folder} is trained for this cache and these settings, keeping it")
        return folder
    with exclusive_folder(acc, folder, META, force, "stain GAN", "stain-gan"):  # one process trains it at a time
        _fit(cfg, cache, spec, folder, acc)
    return folder


def _fit(cfg, cache, spec: dict, folder: Path, acc) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..checkpoint import last_state, load_state, save_state
    from ..data.augment import random_dihedral
    from ..errors import require_finite
    from ..progress import bar
    from ..stain.gan import AGAIN, Generator, PatchDiscriminator
    from ..stain.jitter import luma

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
        require_finite(values.values(), f"{folder}: the stain GAN's losses became non-finite at step {step + 1} "
                                        f"({values}); lower stain_gan.lr - the generator is not marked trained")
        for k, v in values.items():
            logs.setdefault(k, []).append(v)
        steps.set_postfix(gray=f"{values['gray']:.3f}", rgb=f"{values['rgb']:.3f}", disc=f"{values['disc']:.3f}")
        done = step + 1
        if done % RECORD_EVERY == 0 or done == g.steps:
            records.append({"step": done, "seconds": round(time.time() - t0, 1),
                            **{k: round(float(np.mean(v)), 5) for k, v in logs.items()}})
            logs = {}
        if done % g.checkpoint_every == 0 and done < g.steps:
            save_state(
                acc,
                folder / f"state-step{done}",
                {"step": done, "seconds": time.time() - t0, "records": records},
                nbytes,
                f"saving the stain GAN state at step {done}",
            )
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(acc.unwrap_model(gen), cache, spec, folder, records, time.time() - t0, g.steps)
    acc.wait_for_everyone()


def _finish(gen, cache, spec: dict, folder: Path, records: list, seconds: float, steps: int) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    from ..lineage import digest_file
    from ..safeio import atomic, write_csv, write_json
    from ..stain.gan import GENERATOR, META

    with atomic(folder / GENERATOR) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in gen.state_dict().items()}, str(tmp))
    write_csv(folder / "losses.csv", pd.DataFrame(records), index=False)
    _plot_samples(gen, cache, spec, folder / "samples.png")
    write_json(folder / META, {"spec": spec, "key": folder.name, "generator": digest_file(folder / GENERATOR),
                               "steps": steps, "seconds": round(seconds, 1), "final": records[-1] if records else {}})
    for old in folder.glob("state-step*"):
        shutil.rmtree(old, ignore_errors=True)
    print(
        f"stain-gan: generator in {folder / GENERATOR} ({steps} steps, {seconds:.0f} s); samples: "
        f"{folder / 'samples.png'}"
    )


def _plot_samples(gen, cache, spec: dict, path: Path, per_center: int = 4) -> None:
    """Rows: a few patches of each center, as stored and as the generator colours them."""
    import matplotlib
    import numpy as np
    import torch

    from ..safeio import write_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, rng = cache.index, np.random.default_rng(0)
    centers = sorted(int(c) for c in index["center"].unique())
    fig, axes = plt.subplots(
        2 * len(centers), per_center, figsize=(1.6 * per_center, 3.2 * len(centers)), squeeze=False
    )
    device = next(gen.parameters()).device
    for i, c in enumerate(centers):
        x = _batch(cache, index[index["center"] == c], per_center, rng, device)
        with torch.no_grad():
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
