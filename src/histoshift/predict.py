"""The infer stage: 8-view TTA predictions of every finished fold run for its held-out center and
the test center, plain and (with --adabn) after AdaBN on each target center. The views themselves
are `tta.py`; the files and what they were predicted from are the run folder's (`runs.py`).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from .config import Config, load_config
from .data.augment import N_VIEWS, to_float
from .data.cache import Cache
from .data.loader import PatchDataset, make_loader
from .models.backbone import PatchClassifier
from .precision import config_precision
from .runs import load_run_model, RunDir
from .safeio import Lock
from .tta import check_finite, predict_views, view_columns


def predict_table(model, cache: Cache, table: pd.DataFrame, accelerator: Accelerator, cfg: Config,
                  domain_of_center: dict[int, int], views=tuple(range(N_VIEWS)), desc: str = "predict") -> pd.DataFrame:
    ds = PatchDataset(cache.gather(table), table, domain_of_center)
    loader = accelerator.prepare(make_loader(ds, cfg.train.eval_batch_size, train=False))
    return predict_views(model, loader, accelerator, views, desc, precision=config_precision(cfg),
                         channels_last=cfg.train.channels_last, stain_norm=cfg.aug.stain_norm)


@torch.no_grad()
def adapt_batchnorm(model: PatchClassifier, images: np.ndarray, device: torch.device,
                    batch_size: int = 256, stain_norm: str = "none") -> int:
    """AdaBN (Li et al. 2016): replace every batch-norm layer's running statistics by those of the
    target images (plain view, cumulative average over all of them). Returns the layers adapted.
    The batches are a fixed random permutation of the images: files are often ordered by slide, and
    averaging the variances of homogeneous batches would miss the variance between them."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches (equal batches: over the images)
    was_training = model.training
    model.train()
    order = np.random.default_rng(0).permutation(len(images))
    for i in range(0, len(images), batch_size):
        batch = images[np.sort(order[i:i + batch_size])]  # a copy (sorted: sequential memory-map reads)
        x = to_float(torch.from_numpy(batch).to(device), stain_norm)
        model(model.preprocess(x))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(bns)


def infer_run(run: RunDir, cache: Cache, accelerator: Accelerator, force: bool = False, adabn: bool = False) -> None:
    """TTA predictions of one finished fold run for its held-out center and the test set; with
    `adabn`, also a second set for which each target center gets batch-norm statistics re-estimated
    on its own images first. The model is loaded once; sets predicted from this checkpoint and this
    cache are kept, the others (missing, or from an older checkpoint or cache) are predicted again."""
    run.check_inputs(cache.digests)  # a model trained on other data is not silently reused
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        _infer_run(run, cache, accelerator, force, adabn)


def _infer_run(run: RunDir, cache: Cache, accelerator: Accelerator, force: bool, adabn: bool) -> None:
    if load_config(run.config).model.frozen:
        accelerator.print(f"infer: {run.name} is a head on cached features; training wrote its TTA predictions"
                          + (" (nothing to adapt: the stack stage uses them for AdaBN too)" if adabn else ""))
        return
    todo = []
    for adapted in ((False, True) if adabn else (False,)):
        stale = run.stale_predictions(cache.id, adapted)
        if force or stale:
            todo.append(adapted)
            old = [name for name in stale if (run.path / name).exists()]
            if old and not force:
                accelerator.print(f"infer: {run.name}: {', '.join(old)} predate the current checkpoint or cache; predicting again")
        else:
            accelerator.print(f"infer: {run.path}{' (AdaBN)' if adapted else ''} is up to date")
    if not todo:
        return
    index = cache.index
    centers = sorted(index["center"].unique())
    domain_of_center = {c: i for i, c in enumerate(centers)}
    tables = {"heldout": index[(index["split"] != "test") & (index["center"] == run.fold)],
              "test": index[index["split"] == "test"]}
    cfg, trained = load_run_model(run)
    for name, table in tables.items():
        for adapted in todo:
            model = copy.deepcopy(trained) if adapted else trained  # AdaBN adapts a copy to one center at a time
            if adapted:
                model.to(accelerator.device)
                adapt_batchnorm(model, cache.gather(table), accelerator.device,
                                stain_norm=cfg.aug.stain_norm)
            if cfg.train.channels_last:
                model = model.to(memory_format=torch.channels_last)
            model = accelerator.prepare(model)
            out = predict_table(model, cache, table, accelerator, cfg, domain_of_center, desc=f"{run.name} {name}")
            check_finite(out, f"{run.path} ({name}{', AdaBN' if adapted else ''})")
            if name == "test":
                out["label"] = -1
            if accelerator.is_main_process:
                run.write_tta(name, adapted, out, cache.id)
            accelerator.print(f"infer: {run.name} {name}: {len(out)} patches x {len(view_columns(out))} views"
                              + (" (AdaBN)" if adapted else "")
                              + (f", TTA-mean accuracy {_acc(out):.4f}" if name == "heldout" else ""))
    accelerator.wait_for_everyone()


def _acc(table: pd.DataFrame) -> float:
    logit = table[view_columns(table)].mean(axis=1)
    return float(((logit > 0).astype(int) == table["label"]).mean())


def infer_all(runs: list[RunDir], cache_dir: Path, force: bool = False, adabn: bool = False) -> None:
    if not runs:
        raise FileNotFoundError("infer: no finished training runs found; run the train stage first")
    accelerator = Accelerator()  # precision per run, from its config (see predict_table)
    cache = Cache.open(cache_dir)
    for run in runs:  # refuse before predicting anything
        run.check_inputs(cache.digests)
    for run in runs:  # with adabn, two sets of files: the stack stage keeps AdaBN only where it wins LOCO
        infer_run(run, cache, accelerator, force, adabn)
