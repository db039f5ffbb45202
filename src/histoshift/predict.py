"""The infer stage: 8-view TTA predictions of every finished fold run - any kind of model - for its
held-out center and the test center, plain and (with --adabn) after the task adapted the model to each
target center (AdaBN for fine-tuned backbones; a head on stored features re-estimates its feature shift
and self-trains when its config says so). The model and its views are the task's (`tasks.py`); the files
and what they were predicted from are the run folder's (`runs.py`).
"""
from __future__ import annotations

from contextlib import nullcontext

from accelerate import Accelerator

from .data.cache import Cache
from .data.splits import heldout_rows, test_rows, training_rows
from .metrics import logit_accuracy
from .paths import Paths
from .runs import RunDir
from .safeio import Lock
from .tasks import run_task
from .tta import check_finite, view_columns


def infer_run(run: RunDir, cache: Cache, paths: Paths, accelerator: Accelerator, force: bool = False,
              adabn: bool = False) -> None:
    """TTA predictions of one finished fold run for its held-out center and the test set; with `adabn`,
    also a second set for which the model is first adapted to each target center on its own images.
    The model is loaded once; sets predicted from this checkpoint and this cache are kept, the others
    (missing, or from an older checkpoint or cache) are predicted again."""
    run.check_inputs(cache.digests)  # a model trained on other data is not silently reused
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        _infer_run(run, cache, paths, accelerator, force, adabn)


def _todo(run: RunDir, cache: Cache, accelerator: Accelerator, force: bool, adabn: bool) -> list[bool]:
    """The prediction sets (False: plain, True: adapted) to predict again."""
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
    return todo


def _infer_run(run: RunDir, cache: Cache, paths: Paths, accelerator: Accelerator, force: bool, adabn: bool) -> None:
    todo = _todo(run, cache, accelerator, force, adabn)
    if not todo:
        return
    task, trained = run_task(run, cache, paths, accelerator)
    source = training_rows(cache.index, run.fold)  # adaptations that need labels read the fold's own
    for name, table in (("heldout", heldout_rows(cache.index, run.fold)), ("test", test_rows(cache.index))):
        predict = task.predictor(table, desc=f"{run.name} {name}")
        for adapted in todo:
            model, record = _adapted(task, trained, table, source, run, name, accelerator) if adapted else (trained, None)
            out = check_finite(predict(model), f"{run.path} ({name}{', adapted' if adapted else ''})")
            if name == "test":
                out["label"] = -1
            if accelerator.is_main_process:
                run.write_tta(name, adapted, out, cache.id, adaptation=record)
            accelerator.print(f"infer: {run.name} {name}: {len(out)} patches x {len(view_columns(out))} views"
                              + (f" {describe(record)}" if adapted else "")
                              + (f", TTA-mean accuracy {logit_accuracy(out, view_columns(out)):.4f}"
                                 if name == "heldout" else ""))
    accelerator.wait_for_everyone()


MIN_ADAPT_PATCHES = 16  # fewer target patches than this: statistics too noisy to adapt to (plain predictions kept)


def _adapted(task, trained, table, source, run: RunDir, name: str, accelerator: Accelerator):
    """The model adapted to one center, unless the center has too few patches to estimate anything from."""
    if len(table) < MIN_ADAPT_PATCHES:
        accelerator.print(f"infer: warning: {run.name} {name}: {len(table)} patches, fewer than {MIN_ADAPT_PATCHES}: "
                          "not adapted (batch-norm or feature statistics of so few patches are noise); its adapted "
                          "predictions are the plain ones")
        return trained, {"changed": 0, "method": f"none ({len(table)} patches < {MIN_ADAPT_PATCHES})"}
    return task.adapt(trained, table, source)


def describe(record: dict) -> str:
    """One line for an adaptation record (tasks' `adapt`)."""
    text = f"({record['method']}) - {record['changed']} layers/maps/rounds changed"
    if "self_training" in record:
        st = record["self_training"]
        text += f", self-training at confidence {st['threshold']}: {st['pseudo_labelled']} pseudo-labelled per round"
    return text


def infer_all(runs: list[RunDir], paths: Paths, force: bool = False, adabn: bool = False) -> None:
    if not runs:
        raise FileNotFoundError("infer: no finished training runs found; run the train stage first")
    accelerator = Accelerator()  # precision per run, from its config (the task's)
    cache = Cache.open(paths.cache)
    for run in runs:  # refuse before predicting anything
        run.check_inputs(cache.digests)
    for run in runs:  # with adabn, two sets of files: the stack stage keeps them only where they win LOCO
        infer_run(run, cache, paths, accelerator, force, adabn)
