"""Stage `infer`: 8-view TTA logits of every finished fold run (both kinds of model), for its held-out center and
the test center; with --adapt also after the task adapted the model to each center without its labels (files
`tta_*_adapted.csv`; folders predicted before 2026-12-07 have `tta_*_adabn.csv`, read the same way and replaced
when predicted again). The stack stage keeps the adapted set only where its rule does not reject it."""
from __future__ import annotations

from contextlib import nullcontext

from ..data.donors import BETAS, DONORS
from ..stack.sets import ADAPTED, PLAIN, PredictionSet
from . import Stage, timed

STAGE = Stage("8-view TTA logits of every finished fold run (both kinds of model), for its held-out center and "
              "the test center",
              "work/runs/*/seed*/fold*/ (finished), work/cache/, work/features/<key>/ (heads on features)",
              "in each run folder: tta_heldout.csv, tta_test.csv (with --adapt also tta_*_adapted.csv), "
              "predictions.json",
              flow="work/runs/ (finished) -> work/runs/.../tta_*.csv")


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="predict again even when the TTA files are current")
    p.add_argument("--adapt", "--adabn", dest="adapt", action="store_true",
                   help="also predict with each model adapted to each target center without its labels (AdaBN for "
                        "fine-tuned backbones; feature-shift re-estimation and self-training for heads, as their "
                        "configs say); the stack stage keeps them unless leave-one-center-out shows they hurt. "
                        "--adabn is the older name")
    p.add_argument("--fourier", action="store_true",
                   help="also predict Fourier transfer sets (feather-light FDA, stain/fourier.py): "
                        "each patch given the low-frequency amplitudes of its nearest donors of other training "
                        "centers; one set per beta, the stack chooses beta and the number of donors leave one "
                        "center out")
    p.add_argument("--fourier-betas", type=float, nargs="+", default=list(BETAS), metavar="BETA",
                   help=f"disc radii, as a share of the patch side (default: {' '.join(f'{b:g}' for b in BETAS)})")
    p.add_argument("--fourier-donors", type=int, default=DONORS,
                   help=f"donors (views) a patch (default {DONORS}, as the paper)")


def run(a, paths) -> None:
    from ..data.cache import check_inputs
    from ..runs import find_runs

    check_inputs(paths.input, paths.cache)
    fourier = None
    if a.fourier:
        from ..data.donors import FourierTTA
        fourier = FourierTTA(a.fourier_betas, a.fourier_donors)
    timed("infer", infer_all, find_runs(paths.runs), paths, force=a.force, adapt=a.adapt, fourier=fourier)


def infer_run(run, cache, paths, accelerator, force: bool = False, adapt: bool = False, fourier=None) -> None:
    """TTA predictions of one finished fold run for its held-out center and the test set; with `adapt`,
    also a second set for which the model is first adapted to each target center without its labels (the task's
`adapt`: AdaBN for a fine-tuned backbone; feature-shift re-estimation and self-training for a head).
    The model is loaded once; sets predicted from this checkpoint and this cache are kept, the others
    (missing, or from an older checkpoint or cache) are predicted again."""
    from ..safeio import Lock

    run.check_inputs(cache.digests)  # a model trained on other data is not silently reused
    with Lock(run.lock, f"the run {run.path}") if accelerator.is_main_process else nullcontext():
        _infer_run(run, cache, paths, accelerator, force, adapt)
        if fourier is not None:
            _infer_fourier(run, cache, paths, accelerator, force, fourier)


def _todo(run, cache, accelerator, force: bool, adapt: bool) -> list[PredictionSet]:
    """The prediction sets (plain, adapted) to predict again."""
    todo = []
    for pset in ((PLAIN, ADAPTED) if adapt else (PLAIN,)):
        stale = run.tta.stale(cache.id, pset)
        if force or stale:
            todo.append(pset)
            old = [name for name in stale if (run.path / name).exists()]
            if old and not force:
                accelerator.print(
                    f"infer: {run.name}: {', '.join(old)} predate the current checkpoint or cache; predicting again"
                )
        else:
            accelerator.print(f"infer: {run.path}{' (adapted)' if pset.adapted else ''} is up to date")
    return todo


def _infer_run(run, cache, paths, accelerator, force: bool, adapt: bool) -> None:
    from ..data.splits import heldout_rows, test_rows, training_rows
    from ..metrics import logit_accuracy
    from ..tasks import run_task
    from ..stack.folder import adaptation_text
    from ..tta import check_finite, view_columns

    todo = _todo(run, cache, accelerator, force, adapt)
    if not todo:
        return
    task, trained = run_task(run, cache, paths, accelerator)
    source = training_rows(cache.index, run.fold)  # adaptations that need labels read the fold's own
    for name, table in (("heldout", heldout_rows(cache.index, run.fold)), ("test", test_rows(cache.index))):
        predict = task.predictor(table, desc=f"{run.name} {name}")
        for pset in todo:
            adapted = pset.adapted
            model, record = (
                _adapted(task, trained, table, source, run, name, accelerator) if adapted else (trained, None)
            )
            out = check_finite(predict(model), f"{run.path} ({name}{', adapted' if adapted else ''})")
            if name == "test":
                out["label"] = -1
            if accelerator.is_main_process:
                run.tta.write(name, pset, out, cache.id, adaptation=record)
            accelerator.print(f"infer: {run.name} {name}: {len(out)} patches x {len(view_columns(out))} views"
                              + (f" {adaptation_text(record, changed=True)}" if adapted else "")
                              + (f", TTA-mean accuracy {logit_accuracy(out, view_columns(out)):.4f}"
                                 if name == "heldout" else ""))
    accelerator.wait_for_everyone()


def _infer_fourier(run, cache, paths, accelerator, force: bool, fourier) -> None:
    """The Fourier transfer sets of one run (the plain, unadapted model), one per beta; a head on stored features
    reads them from a store of the transfers (embedded once for its backbone, every head and fold)."""
    from ..data.splits import heldout_rows, test_rows
    from ..tasks import run_task
    from ..tta import check_finite

    todo = [
        b
        for b in fourier.betas
        if force or run.tta.stale(cache.id, PredictionSet.fourier(b), fourier.settings(b, cache))
    ]
    if not todo:
        accelerator.print(f"infer: {run.path} (Fourier sets) is up to date")
        return
    task, trained = run_task(run, cache, paths, accelerator)
    # centers outside, betas inside: an image task reads a center's patches once for every beta
    for name, table in (("heldout", heldout_rows(cache.index, run.fold)), ("test", test_rows(cache.index))):
        for beta in todo:
            predict = task.fourier_predictor(table, fourier, beta, desc=f"{run.name} {name} beta {beta:g}")
            out = check_finite(predict(trained), f"{run.path} ({name}, Fourier transfer beta {beta:g})")
            if name == "test":
                out["label"] = -1
            if accelerator.is_main_process:
                run.tta.write(
                    name, PredictionSet.fourier(beta), out, cache.id, settings=fourier.settings(beta, cache)
                )
            accelerator.print(
                f"infer: {run.name} {name}: Fourier transfer beta {beta:g}, {fourier.donors} donors a patch"
            )
    accelerator.wait_for_everyone()


MIN_ADAPT_PATCHES = 16  # fewer target patches than this: statistics too noisy to adapt to (plain predictions kept)


def _adapted(task, trained, table, source, run, name: str, accelerator):
    """The model adapted to one center, unless the center has too few patches to estimate anything from."""
    if len(table) < MIN_ADAPT_PATCHES:
        accelerator.print(f"infer: warning: {run.name} {name}: {len(table)} patches, fewer than {MIN_ADAPT_PATCHES}: "
                          "not adapted (batch-norm or feature statistics of so few patches are noise); its adapted "
                          "predictions are the plain ones")
        return trained, {"changed": 0, "method": f"none ({len(table)} patches < {MIN_ADAPT_PATCHES})"}
    return task.adapt(trained, table, source)


def infer_all(runs: list, paths, force: bool = False, adapt: bool = False, fourier=None) -> None:
    from accelerate import Accelerator

    from ..data.cache import Cache
    from ..errors import Missing

    if not runs:
        raise Missing("infer: no finished training runs found; run the train stage first")
    accelerator = Accelerator()  # precision per run, from its config (the task's)
    cache = Cache.open(paths.cache)
    for run in runs:  # refuse before predicting anything
        run.check_inputs(cache.digests)
    for run in runs:  # with adapt, two sets of files: the stack stage keeps them only where they win LOCO
        infer_run(run, cache, paths, accelerator, force, adapt, fourier)
