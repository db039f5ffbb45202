"""Stage `robustify`: tune a config's backbone so that stain views of one patch embed alike (model.robustify).

The objective of "Robustifying pathology foundation models" (arXiv 2607.22861) without scanner pairs: two views of
each unlabelled patch, drawn from every center of the cache (train, val and test images; no label is read), each a
random dihedral view with strong HED stain jitter (model.robustify.pair=reinhard: the second view first takes the
colour statistics of a patch of another center); InfoNCE between the views (models/robust.py: views of one patch
are never negatives), LoRA adapters (peft) for foundation recipes, the last block groups for timm CNNs (the tuned
part's batch norms train, the frozen part's keep their statistics). AdamW, 10% linear warm-up then cosine. The
batches and the jitter are a function of (seed, step, process): a killed run resumes (state-step<N>/, nothing
unpickled) to the same weights. The tuned backbone is a new identity: `embed` and `train` use it for a config with
model.robustify, and the feature store's key and the runs' lineage name it. The steps: robustify_steps.py; the
loop (resume, records, saved states): steploop.py, shared with the training engine and the stain GAN.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import STEP_STATES, clear_states
from . import Stage, config_arguments, experiment, timed

STAGE = Stage("tune a config's backbone so that stain views of one unlabelled patch embed alike (model.robustify)",
              "--config YAML with model.robustify; work/cache/ (every center's images, no labels)",
              "work/robust/<key>/: tuned.safetensors (LoRA adapters or the CNN), meta.json, losses.csv",
              flow="configs/*.yaml, work/cache/ -> work/robust/<key>/")
RECORD_EVERY = 10  # steps per line of losses.csv
AGAIN = "robustify --force starts it again"


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="tune again (the previous tuned backbone is kept aside)")
    config_arguments(p, "model.robustify.steps=100")


def run(a, paths) -> None:
    from ..data.cache import Cache, check_inputs

    cfg = experiment(a)
    if cfg.model.robustify is None:  # before torch is imported: train.sh asks every config
        print(f"robustify: {cfg.name} has no model.robustify: nothing to tune")
        return
    check_inputs(paths.input, paths.cache)
    timed("robustify", robustify, cfg, Cache.open(paths.cache), paths, force=a.force)


def robustify(cfg, cache, paths, force: bool = False, accelerator=None) -> Path:
    """Tune (or resume, or keep) the backbone of `cfg.model.robustify` on `cache`; returns its folder."""
    from accelerate import Accelerator

    from ..models.robust import META, robust_folder
    from ..checkpoint import exclusive_folder
    from ..precision import config_precision

    spec, folder = robust_folder(cfg.model, cache.id, paths.robust)
    precision = config_precision(cfg)
    acc = accelerator or Accelerator(mixed_precision="fp16" if precision == "fp16" else "no")
    if (folder / META).exists() and not force:
        acc.print(f"robustify: {folder} is tuned for this backbone, cache and these settings, keeping it")
        return folder
    with exclusive_folder(acc, folder, META, force, "tuned backbone", "robustify"):  # one process tunes it at a time
        _fit(cfg, cache, spec, folder, acc, precision)
    return folder


def _fit(cfg, cache, spec: dict, folder: Path, acc, precision: str) -> None:
    from ..robustify_steps import RobustSteps
    from ..steploop import StepLoop

    r = cfg.model.robustify
    steps = RobustSteps(cfg, cache, acc, precision)
    acc.print(f"robustify: {folder.name}: {steps.method}, {sum(p.numel() for p in steps.trainable):,} parameters "
              f"tune, {len(steps.rows)} patches of centers {sorted(int(c) for c in steps.rows['center'].unique())}, "
              f"precision {precision}")
    loop = StepLoop(acc, folder, STEP_STATES, r.steps, "step", f"robustify {folder.name}",
                    "lower model.robustify.lr - the backbone is not marked tuned", AGAIN, steps.nbytes,
                    checkpoint_every=r.checkpoint_every, record_every=RECORD_EVERY, progress_bar=True)
    trained = loop.run(steps.step, state=steps.state, restore=steps.restore)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(acc.unwrap_model(steps.backbone), steps.method, spec, folder, trained.records, trained.seconds,
                r.steps)
    acc.wait_for_everyone()


def _finish(backbone, method: str, spec: dict, folder: Path, records: list, seconds: float, steps: int) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    from ..lineage import digest_file
    from ..models.robust import META, TUNED, tuned_state
    from ..safeio import atomic, write_csv, write_json

    with atomic(folder / TUNED) as tmp:
        save_file(tuned_state(backbone, method), str(tmp))
    write_csv(folder / "losses.csv", pd.DataFrame(records), index=False)
    write_json(folder / META, {"spec": spec, "key": folder.name, "method": method, "tuned": digest_file(folder / TUNED),
                               "steps": steps, "seconds": round(seconds, 1),
                               "first": records[0] if records else {}, "final": records[-1] if records else {}})
    clear_states(folder, STEP_STATES)
    first, last = (records[0]["loss"], records[-1]["loss"]) if records else (float("nan"),) * 2
    print(
        f"robustify: tuned backbone in {folder / TUNED} ({steps} steps, {seconds:.0f} s; InfoNCE {first:.3f} -> "
        f"{last:.3f})"
    )
