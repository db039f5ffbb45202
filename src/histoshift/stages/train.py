"""Stage `train`: one fold of one experiment, its run folder and what it was computed from.

Fold k holds out center k: its labelled patches are predicted out of fold. They never select the model, except
with train.early_stop_patience, which picks the epoch on them (the held-out accuracy of such a run is optimistic;
the stack's choice names those members). This module does the stage's I/O and lineage only: the data of the
fold come from `data/splits.py`, the model and its batches from the task (`tasks/`: a fine-tuned backbone or a
head on stored features), the optimisation from the engine (`engine.py`). Runs on one CPU, one GPU, or many
processes with `accelerate launch`. Predictions for the stack stage are the infer stage's.
"""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext

from ..checkpoint import EPOCH_STATES, clear_states
from ..safeio import human
from . import Stage, config_arguments, experiment, seed as seed_option, timed

STAGE = Stage("train one config on some or all folds (resumes a killed run from its last epoch)",
              "--config YAML, work/cache/, folds/folds.csv; fine-tuned foundation models: the hub, HF_HUB_CACHE "
              "or model.weights; heads on features: work/features/<key>/ (embedded first when missing)",
              "work/runs/<name>/seed<S>/fold<K>/: config.yaml, inputs.json, metrics.jsonl, model.safetensors, "
              "oof.csv, summary.json, done (state-epoch<N>/ until done)",
              flow="configs/*.yaml, work/cache/, folds/ -> work/runs/<name>/seed<S>/fold<K>/")


def arguments(p) -> None:
    p.add_argument("--fold", default="all", help="'all' or comma-separated held-out centers")
    p.add_argument("--seed", type=seed_option, default=None, help="shorthand for train.seed=N")
    p.add_argument("--force", action="store_true", help="retrain finished runs (the old ones are kept)")
    p.add_argument("--pseudo", type=float, default=None, metavar="T",
                   help="one round of pseudo-labelling after a first train/infer/stack: the config again as "
                        "NAME_pl, with the test patches the ensemble is at least T sure of (train.pseudo_threshold)")
    config_arguments(p, "optim.lr=3e-4 train.epochs=5")


def run(a, paths) -> None:
    from ..config import ConfigError
    from ..data.cache import check_inputs
    from ..data.folds import read_folds
    from ..runs import RunDir

    cfg = experiment(a)
    check_inputs(paths.input, paths.cache)
    known = sorted(int(f) for f in read_folds(paths.folds_csv)["fold"].unique())
    try:
        folds = known if a.fold == "all" else [int(f) for f in a.fold.split(",")]
    except ValueError:
        raise ConfigError(f"--fold {a.fold}: expected 'all' or comma-separated held-out centers {known}") from None
    if set(folds) - set(known):
        raise ConfigError(f"--fold {a.fold}: folds are the labelled centers {known}")
    for fold in folds:
        run_dir = RunDir.of(paths.runs, cfg.name, cfg.train.seed, int(fold))
        timed(f"train {run_dir.name}", train_fold, cfg, paths, run_dir, force=a.force)


IN_SAMPLE_EVAL = 2000  # labelled patches per training center scored in sample for the summary


def train_fold(cfg, paths, run, force: bool = False) -> dict | None:
    from accelerate import Accelerator

    from .. import tracking
    from ..precision import config_precision
    from ..safeio import Lock

    precision = config_precision(cfg)
    # bf16 needs no loss scaling: the loop's own autocast does it; fp16 needs Accelerate's scaler
    accelerator = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no",
                              **tracking.accelerator_kwargs(cfg.train.log_with, run.path))
    # one process trains a run folder at a time (the lock dies with its holder, kill -9 included)
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        return _train_fold(cfg, paths, run, force, accelerator, precision)


def run_writes(cfg, algorithm, rows: int) -> tuple[int, str]:
    """The most a fold run has on disk at once, from the model's own sizes: the checkpoint and the per-patch
    files; with more than one epoch, two epoch states while the newer one is written (the algorithm's state:
    model and domain head, two AdamW moments per trainable tensor, early stopping's best weights, RNG and loop
    files). Measured on the tiny test runs: tests/reliability/test_faults_found_by_reading_the_code.py."""
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    weights = nbytes(algorithm.model.state_dict().values())
    files = weights + 64 * rows + (256 << 10)  # the checkpoint; oof.csv (~40 bytes a patch), metrics, summary
    if cfg.train.epochs == 1:
        return files, f"the checkpoint and its files, {human(files)}"
    state = nbytes(algorithm.state_dict().values()) + 2 * nbytes(p for p in algorithm.parameters() if p.requires_grad)
    state += (weights if cfg.train.early_stop_patience else 0) + (256 << 10)  # + RNG states, loop.json
    state += weights * {"none": 0, "ema": 1, "swa": 1, "swad": cfg.train.epochs}[cfg.train.average]  # the averages
    return max(files, 2 * state), f"two epoch states while the newer is written, {human(2 * state)}"


def run_inputs(cfg, task, cache, paths) -> dict:
    """What a run is computed from besides its config (recorded in inputs.json)."""
    from ..data.splits import pseudo_source
    from ..lineage import digest_file

    inputs = {"task": task.kind, "cache": cache.digests, "folds": digest_file(paths.folds_csv), **task.lineage()}
    if cfg.train.pseudo_threshold > 0:
        inputs["pseudo"] = digest_file(pseudo_source(cache, paths.stack))
    return inputs


def fold_data(cfg, cache, folds, paths, fold: int, print_fn=print):
    """The fold's labelled training rows (plus a pseudo-label round's test patches), held-out rows,
    unlabelled target rows and the number of pseudo-labelled patches."""
    import pandas as pd

    from ..data.splits import pseudo_labels, split_for_fold

    source, heldout, target = split_for_fold(cache.index, folds, fold)
    extra = source.iloc[:0]
    if cfg.train.pseudo_threshold > 0:
        extra = pseudo_labels(cache, cfg.train.pseudo_threshold, paths.stack)
        source = pd.concat([source, extra[source.columns.intersection(extra.columns)]], ignore_index=True)
        print_fn(f"train fold {fold}: + {len(extra)} pseudo-labelled test patches "
                 f"(ensemble probability beyond {cfg.train.pseudo_threshold})")
    return source, heldout, target, len(extra)


def _train_fold(cfg, paths, run, force: bool, accelerator, precision: str) -> dict | None:
    import pandas as pd
    from accelerate.utils import broadcast_object_list, set_seed

    from .. import tracking
    from ..algorithms import ALGORITHMS
    from ..config import save_config
    from ..data.cache import Cache
    from ..data.folds import check_folds, read_folds
    from ..data.splits import in_sample
    from ..engine import fit
    from ..lineage import StaleError, changed
    from ..metrics import per_center
    from ..runs import INPUT_NAMES
    from ..safeio import require_free, write_csv, write_json, write_text
    from ..tasks import make_task

    cache = Cache.open(paths.cache)
    folds = read_folds(paths.folds_csv)
    check_folds(folds, cache.index, paths.folds_csv)  # before anything is trained: no leak, no stale ids
    task = make_task(cfg, cache, paths, accelerator)
    inputs = run_inputs(cfg, task, cache, paths)
    mode = [run_mode(run, cfg, force, inputs) if accelerator.is_main_process else None]
    mode = broadcast_object_list(mode)[0]  # every process follows the main one's decision
    if mode == "skip":
        return None
    task.stored_data()  # a head's feature store, embedded here if the embed stage did not run: before the
    seed = cfg.train.seed + 1000 * run.fold  # seed, so the head's init never depends on whether it did
    if mode == "resume" and run_inputs(cfg, task, cache, paths) != inputs:  # chunks embedded again just now
        moved = changed(inputs, run_inputs(cfg, task, cache, paths))
        raise StaleError(f"{run.path}: {' and '.join(INPUT_NAMES.get(k, k) for k in moved)} changed while the fold "
                         "was interrupted: its saved epochs were trained on the old features and are not continued "
                         "on new ones; train it again (train --force)")
    set_seed(seed, device_specific=True)
    if accelerator.is_main_process and mode == "fresh":
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        write_json(run.inputs, run_inputs(cfg, task, cache, paths))  # again: a store embedded just now has its stamp

    tracking.start(accelerator, cfg.train.log_with, run.name, cfg.flat(), paths.root)  # after prepare: in the run
    source, heldout, target, n_pseudo = fold_data(cfg, cache, folds, paths, run.fold, accelerator.print)
    accelerator.print(f"train {run.name}: {len(source)} labelled patches from centers "
                      f"{sorted(int(c) for c in source['center'].unique())}, held-out center {run.fold} "
                      f"({len(heldout)}), {len(target)} unlabelled target patches, precision {precision}, "
                      f"{task.kind} task")
    algorithm = ALGORITHMS[cfg.algorithm.name](task.build_model(source), len(task.domains), cfg)
    algorithm.observe(source, target, task.domains)  # counts for the reweighting switches (none by default)
    if cfg.optim.name == "nero" and cfg.model.fine_tuned and cfg.model.source.pretrained:
        accelerator.print(
            "warning: optim.name=nero re-centres and re-normalises every weight matrix at its first step, "
            "which erases much of a pretrained backbone (measured: -21.6 points on the reduced protocol, "
            "docs/benchmarks.md); the published recipe used it for a head on frozen features"
        )
    if accelerator.is_main_process:  # before training: a trained fold is never thrown away for want of space
        need, what = run_writes(cfg, algorithm, len(heldout))
        require_free(run.path, need, f"training this fold ({what})", margin=8 << 20)
    streams = task.streams(source, target, seed)
    heldout_predictor = task.predictor(heldout, views=1, desc="held-out")
    fitted = fit(cfg, task, algorithm, streams, heldout_predictor, accelerator, run, precision,
                 resume=mode == "resume")
    model, oof = fitted.model, fitted.oof
    # every labelled center for the summary: the held-out one out of fold (the last epoch's predictions,
    # not predicted again), the training ones in sample
    trained_on = task.predictor(in_sample(cache.index, run.fold, IN_SAMPLE_EVAL), 1, "in sample")(model)
    table = per_center(pd.concat([oof, trained_on.rename(columns={"v0": "logit"})], ignore_index=True))
    table["held_out"] = table["center"] == run.fold
    summary = None
    if accelerator.is_main_process:
        held = table[table["held_out"]].iloc[0]
        require_free(run.path, fitted.model_bytes, "the checkpoint")
        task.save(run, model)
        write_csv(run.oof, oof, float_format="%.6g")
        summary = {"run": run.name, "fold": run.fold, "seconds": round(fitted.seconds, 1),
                   "heldout_accuracy": float(held["accuracy"]), "heldout_auc": float(held["auc"]),
                   "heldout_brier": float(held["brier"]), "heldout_ece": float(held["ece"]),
                   "pseudo_labels": n_pseudo, **fitted.average, **accelerator.unwrap_model(model).sparsity(),
                   "per_center": table.to_dict(orient="records")}
        write_json(run.summary, summary)
        write_text(run.done, time.strftime("%Y-%m-%d %H:%M:%S\n"))
        clear_states(run.path, EPOCH_STATES)  # done: the resumable states have served
        accelerator.print(table.to_string(index=False))
    accelerator.log(tracking.per_center_values(table), step=cfg.train.epochs)
    tracking.finish(accelerator)
    accelerator.wait_for_everyone()
    return summary


def run_mode(run, cfg, force: bool, inputs: dict) -> str:
    """'skip', 'resume' or 'fresh'. A finished run with the same config and inputs (task kind, cache
    digests, folds, a head's feature store, pseudo-labels) is kept; a finished run with another
    config or other inputs is never overwritten without `force` (then it is moved aside). An
    unfinished run with a saved epoch and the same config and inputs resumes; any other starts over."""
    from ..config import load_config
    from ..errors import Exists
    from ..lineage import changed
    from ..runs import INPUT_NAMES

    recorded = run.recorded_inputs()
    same = run.config.exists() and load_config(run.config).identity() == cfg.identity()
    if run.is_done:
        if same and recorded == inputs and not force:
            print(f"train: {run.path} is done with this config, skipping")
            return "skip"
        if not force:
            what = ("another config" if not same else f"other inputs "
                    f"({', '.join(INPUT_NAMES.get(k, k) for k in changed(recorded, inputs))} changed since)")
            raise Exists(f"{run.path} holds a finished run with {what}; "
                                  "pass --force to move it aside and retrain")
        aside = run.path.with_name(f"{run.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run.path.rename(aside)
        print(f"train: moved the previous run to {aside}")
    elif run.path.exists():
        if same and recorded == inputs and run.last_state() is not None and not force:
            return "resume"
        why = "no saved epoch" if same and recorded == inputs else "another config or other inputs"
        print(f"train: {run.path} holds an unfinished run ({why}); starting it again")
        shutil.rmtree(run.path)
    return "fresh"
