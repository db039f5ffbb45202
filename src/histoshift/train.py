"""Stage `train`: one fold of one experiment, its run folder and what it was computed from.

Fold k holds out center k: its labelled patches are predicted out of fold and never used for model
selection. This module does the stage's I/O and lineage only: the data of the fold come from
`data/splits.py`, the model and its batches from the task (`tasks.py`: a fine-tuned backbone or a head
on stored features), the optimisation from the engine (`engine.py`). Runs on one CPU, one GPU, or
many processes with `accelerate launch`. Predictions for the stack stage are the infer stage's.
"""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext

import pandas as pd
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from . import tracking
from .algorithms import ALGORITHMS
from .config import Config, save_config
from .data.cache import Cache
from .data.folds import check_folds, read_folds
from .data.splits import in_sample, pseudo_labels, pseudo_source, split_for_fold
from .engine import fit
from .lineage import digest_file
from .metrics import per_center
from .paths import Paths
from .precision import config_precision
from .runs import RunDir
from .safeio import Lock, require_free, write_csv, write_json, write_text
from .tasks import make_task

IN_SAMPLE_EVAL = 2000  # labelled patches per training center scored in sample for the summary


def train_fold(cfg: Config, paths: Paths, run: RunDir, force: bool = False) -> dict | None:
    precision = config_precision(cfg)
    # bf16 needs no loss scaling: the loop's own autocast does it; fp16 needs Accelerate's scaler
    accelerator = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no",
                              **tracking.accelerator_kwargs(cfg.train.log_with, run.path))
    # one process trains a run folder at a time (the lock dies with its holder, kill -9 included)
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        return _train_fold(cfg, paths, run, force, accelerator, precision)


def run_inputs(cfg: Config, task, cache: Cache, paths: Paths) -> dict:
    """What a run is computed from besides its config (recorded in inputs.json)."""
    inputs = {"task": task.kind, "cache": cache.digests, "folds": digest_file(paths.folds_csv), **task.lineage()}
    if cfg.train.pseudo_threshold > 0:
        inputs["pseudo"] = digest_file(pseudo_source(cache, paths.stack))
    return inputs


def fold_data(cfg: Config, cache: Cache, folds: pd.DataFrame, paths: Paths, fold: int, print_fn=print):
    """The fold's labelled training rows (plus a pseudo-label round's test patches), held-out rows,
    unlabelled target rows and the number of pseudo-labelled patches."""
    source, heldout, target = split_for_fold(cache.index, folds, fold)
    extra = source.iloc[:0]
    if cfg.train.pseudo_threshold > 0:
        extra = pseudo_labels(cache, cfg.train.pseudo_threshold, paths.stack)
        source = pd.concat([source, extra[source.columns.intersection(extra.columns)]], ignore_index=True)
        print_fn(f"train fold {fold}: + {len(extra)} pseudo-labelled test patches "
                 f"(ensemble probability beyond {cfg.train.pseudo_threshold})")
    return source, heldout, target, len(extra)


def _train_fold(cfg: Config, paths: Paths, run: RunDir, force: bool, accelerator: Accelerator,
                precision: str) -> dict | None:
    cache = Cache.open(paths.cache)
    folds = read_folds(paths.folds_csv)
    check_folds(folds, cache.index, paths.folds_csv)  # before anything is trained: no leak, no stale ids
    task = make_task(cfg, cache, paths, accelerator)
    inputs = run_inputs(cfg, task, cache, paths)
    mode = [run.prepare(cfg, force, inputs) if accelerator.is_main_process else None]
    mode = broadcast_object_list(mode)[0]  # every process follows the main one's decision
    if mode == "skip":
        return None
    task.stored_data()  # a head's feature store, embedded here if the embed stage did not run: before the
    seed = cfg.train.seed + 1000 * run.fold  # seed, so the head's init never depends on whether it did
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
    if cfg.optim.name == "nero" and not cfg.model.frozen and cfg.model.weights != "none":
        accelerator.print("warning: optim.name=nero re-centres and re-normalises every weight matrix at its first step, "
                          "which erases much of a pretrained backbone (measured: -21.6 points on the reduced protocol, "
                          "docs/benchmarks.md); the published recipe used it for a head on frozen features")
    if accelerator.is_main_process:  # before training: a trained fold is never thrown away for want of space
        weights = sum(t.numel() * t.element_size() for t in algorithm.model.state_dict().values())
        require_free(run.path, 4 * weights, "training this fold (an epoch state: weights and two AdamW moments; "
                     "then the checkpoint)")
    streams = task.streams(source, target, seed)
    heldout_predictor = task.predictor(heldout, views=1, desc="held-out")
    model, oof, seconds, model_bytes = fit(cfg, task, algorithm, streams, heldout_predictor, accelerator, run,
                                           precision, resume=mode == "resume")
    # every labelled center for the summary: the held-out one out of fold (the last epoch's predictions,
    # not predicted again), the training ones in sample
    trained_on = task.predictor(in_sample(cache.index, run.fold, IN_SAMPLE_EVAL), 1, "in sample")(model)
    table = per_center(pd.concat([oof, trained_on.rename(columns={"v0": "logit"})], ignore_index=True))
    table["held_out"] = table["center"] == run.fold
    summary = None
    if accelerator.is_main_process:
        held = table[table["held_out"]].iloc[0]
        require_free(run.path, model_bytes, "the checkpoint")
        task.save(run, model)
        write_csv(run.oof, oof, float_format="%.6g")
        summary = {"run": run.name, "fold": run.fold, "seconds": round(seconds, 1),
                   "heldout_accuracy": float(held["accuracy"]), "heldout_auc": float(held["auc"]),
                   "heldout_brier": float(held["brier"]), "heldout_ece": float(held["ece"]),
                   "pseudo_labels": n_pseudo, **accelerator.unwrap_model(model).sparsity(),
                   "per_center": table.to_dict(orient="records")}
        write_json(run.summary, summary)
        write_text(run.done, time.strftime("%Y-%m-%d %H:%M:%S\n"))
        for state in run.path.glob("state-epoch*"):  # done: the resumable states have served
            shutil.rmtree(state, ignore_errors=True)
        accelerator.print(table.to_string(index=False))
    accelerator.log(tracking.per_center_values(table), step=cfg.train.epochs)
    tracking.finish(accelerator)
    accelerator.wait_for_everyone()
    return summary
