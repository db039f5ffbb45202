"""Stage `stain-gan`: train the stain GAN of a config with aug.stain_norm: gan (the model and its use: stain/gan.py).

Losses per step: least-squares adversarial + gray_weight x grayscale cycle + rgb_weight x RGB cycle for the
generator, least squares for the PatchGAN; Adam (0.5, 0.999), the learning rate constant then linearly to zero
over the second half. The batches and the jitter are a function of (seed, step, process), so a killed run resumes
(state-step<N>/, checkpoint.py: nothing unpickled) to the bit-identical generator. A non-finite loss stops it with
the engine's rule (errors.NonFiniteError): nothing is marked trained. The steps: stain_gan_steps.py; the loop
(resume, records, saved states): steploop.py, shared with the training engine and robustify.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import STEP_STATES, clear_states
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
    from ..stain.gan import AGAIN
    from ..stain_gan_steps import GanSteps
    from ..steploop import StepLoop

    g = cfg.stain_gan
    gan = GanSteps(cfg, cache, spec, acc)
    loop = StepLoop(acc, folder, STEP_STATES, g.steps, "step", f"stain-gan {folder.name}",
                    "lower stain_gan.lr - the generator is not marked trained", AGAIN, gan.nbytes,
                    checkpoint_every=g.checkpoint_every, record_every=RECORD_EVERY, progress_bar=True)
    trained = loop.run(gan.step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(acc.unwrap_model(gan.gen), cache, spec, folder, trained.records, trained.seconds, g.steps)
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
    clear_states(folder, STEP_STATES)
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
    from ..stain_gan_steps import random_batch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, rng = cache.index, np.random.default_rng(0)
    centers = sorted(int(c) for c in index["center"].unique())
    fig, axes = plt.subplots(
        2 * len(centers), per_center, figsize=(1.6 * per_center, 3.2 * len(centers)), squeeze=False
    )
    device = next(gen.parameters()).device
    for i, c in enumerate(centers):
        x = random_batch(cache, index[index["center"] == c], per_center, rng, device)
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
