"""One entry point, one sub-command per stage: python -m histoshift [--root DIR] <stage> ...

Every stage reads and writes under one root folder (the repository by default); `input/` is yours
and never written. Every stage is idempotent: run again with unchanged inputs, it does nothing it
has done before; a changed input makes the stages after it recompute or refuse with one line.
`<stage> --help` says exactly what a stage reads and writes.
"""
from __future__ import annotations

import argparse
import errno
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import Paths


@dataclass(frozen=True)
class Stage:
    """A sub-command: what it does, what it reads and what it writes (shown by --help)."""
    help: str
    reads: str
    writes: str
    flow: str = ""  # the short form for the top-level help: what it takes -> what it makes

    def description(self) -> str:
        wrap = lambda label, text: textwrap.fill(text, 100, initial_indent=label, subsequent_indent=" " * len(label))
        return f"{self.help}.\n\n{wrap('reads:  ', self.reads)}\n{wrap('writes: ', self.writes)}"


STAGES = {  # in pipeline order; the paths are relative to --root
    "demo-data": Stage("write the synthetic demo dataset (NOT tissue) in the competition layout",
                       "nothing", "input/{train,val,test}.h5 (or --out), unless one of them exists",
                       flow="-> input/*.h5 (synthetic)"),
    "prepare": Stage("validate the HDF5 files and build the uint8 cache with aberrant-patch flags",
                     "input/train.h5, input/val.h5, input/test.h5",
                     "work/cache/: images_{train,val,test}.npy, index.csv, quality_report.csv, manifest.json "
                     "(digests), overview.png, colours.png, colour_stats.csv",
                     flow="input/*.h5 -> work/cache/"),
    "folds": Stage("assign each labelled patch the fold of its center (leave one center out)",
                   "work/cache/index.csv", "folds/folds.csv (an existing different one is kept unless --force)",
                   flow="work/cache/ -> folds/folds.csv"),
    "preflight": Stage("check every config before anything long starts: weights reachable (cache, folder, file, "
                       "package, optional dependency, gated access), feature store size against free disk, GPU "
                       "memory, projected embedding time; each problem one line, exit 2",
                       "--config YAML (repeatable), work/cache/ or input/*.h5 (patch counts), the hub cache",
                       "nothing (prints a table)",
                       flow="configs/*.yaml -> (prints the preflight table)"),
    "stain-gan": Stage("train the stain-normalising generator of a config with aug.stain_norm: gan (MultiStain-CycleGAN "
                       "on the cache's unlabelled patches, towards stain_gan.target_center; resumes a killed run; any "
                       "other config has nothing to train)",
                       "--config YAML, work/cache/",
                       "work/stain_gan/<key>/: generator.safetensors, meta.json, losses.csv, samples.png (key: the "
                       "cache and every stain_gan setting)",
                       flow="configs/*.yaml, work/cache/ -> work/stain_gan/<key>/"),
    "embed": Stage("embed every patch once with the backbone of a heads-on-features config (model.frozen; resumes "
                   "a killed run; a fine-tuned config has nothing to embed)",
                   "--config YAML, work/cache/; foundation models: the hub, HF_HUB_CACHE or model.weights",
                   "work/features/<key>/: features_{train,val,test}.npy, spec.json, meta.json (key: everything the "
                   "features depend on)",
                   flow="configs/*.yaml, work/cache/ -> work/features/<key>/"),
    "train": Stage("train one config on some or all folds (resumes a killed run from its last epoch)",
                   "--config YAML, work/cache/, folds/folds.csv; fine-tuned foundation models: the hub, HF_HUB_CACHE "
                   "or model.weights; heads on features: work/features/<key>/ (embedded first when missing)",
                   "work/runs/<name>/seed<S>/fold<K>/: config.yaml, inputs.json, metrics.jsonl, model.safetensors, "
                   "oof.csv, summary.json, done (state-epoch<N>/ until done)",
                   flow="configs/*.yaml, work/cache/, folds/ -> work/runs/<name>/seed<S>/fold<K>/"),
    "infer": Stage("8-view TTA logits of every finished fold run (both kinds of model), for its held-out center and "
                   "the test center",
                   "work/runs/*/seed*/fold*/ (finished), work/cache/, work/features/<key>/ (heads on features)",
                   "in each run folder: tta_heldout.csv, tta_test.csv (with --adabn also tta_*_adabn.csv), "
                   "predictions.json",
                   flow="work/runs/ (finished) -> work/runs/.../tta_*.csv"),
    "stack": Stage("score mean logits, rank average and a LightGBM stacker leave one center out, pick one, "
                   "score the test center",
                   "the runs' tta_*.csv, folds/folds.csv, work/cache/",
                   "work/stack/: oof_features.csv, test_features.csv, comparison.csv, test_scores.csv, choice.json",
                   flow="work/runs/.../tta_*.csv, folds/ -> work/stack/"),
    "submit": Stage("write the submission after checking it against test.h5's ids",
                    "work/stack/test_scores.csv, work/stack/choice.json, input/test.h5, work/cache/manifest.json",
                    "submissions/submission.csv (the previous one is kept as submission.<time>.csv)",
                    flow="work/stack/, input/test.h5 -> submissions/submission.csv"),
    "report": Stage("markdown summary and plots of the runs and combiners",
                    "work/runs/, work/stack/, work/cache/overview.png",
                    "work/report/: report.md, curves.png, combiners.png, per_center.png, roc.png; feature_map.png "
                    "when a fine-tuned run is present",
                    flow="work/runs/, work/stack/ -> work/report/"),
    "score": Stage("accuracy of the submission against a labels CSV (demo and offline benchmarks)",
                   "submissions/submission.csv, --labels CSV (ID,label)", "nothing (prints the accuracy)",
                   flow="submissions/submission.csv, --labels -> (prints)"),
    "recipes": Stage("list the foundation-model recipes (hub id, embedding, input, mean/std, precision, licence)",
                     "nothing", "nothing (prints a markdown table)",
                     flow="-> (prints the recipe table)"),
    "fm-standin": Stage("write small RANDOM-weight stand-ins of foundation models, to run the hub path offline "
                        "without the real weights", "nothing",
                        "--out: a Hugging Face hub cache (point HF_HUB_CACHE at it) or, with --layout dir, "
                        "a folder of the repo's files",
                        flow="-> --out (a hub cache or folder)"),
}


def _stage_table() -> str:
    width = max(map(len, STAGES))
    return ("what each stage reads -> writes (paths under --root; `<stage> --help` names the files):\n"
            + "\n".join(f"  {name:<{width}}  {st.flow}" for name, st in STAGES.items()))


def _timed(name: str, fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    print(f"[{name}] finished in {time.time() - t0:.1f} s", flush=True)
    return out


def cmd_demo_data(a, paths: Paths):
    from .data.demo import make_demo

    out = Path(a.out) if a.out else paths.input
    for name in ("train.h5", "val.h5", "test.h5"):
        if (out / name).exists():
            print(f"demo-data: {out / name} exists, keeping it")
            return
    make_demo(out, per_center=a.per_center, test_size=a.test_size, seed=a.seed)
    print(f"demo-data: wrote a synthetic demo dataset (NOT real tissue) to {out}")


def cmd_prepare(a, paths: Paths):
    from .data.cache import Contract, prepare
    from .data.quality import QualityRule

    rule = QualityRule(max_black=a.max_black, max_white_frac=a.max_white_frac)
    _timed("prepare", prepare, paths.input, paths.cache, rule, force=a.force, contract=Contract.parse(a.centers),
           workers=a.workers, verify=a.verify)


def cmd_folds(a, paths: Paths):
    from .data.cache import check_inputs, load_index
    from .data.folds import write_folds
    from .safeio import Lock

    check_inputs(paths.input, paths.cache)
    with Lock(paths.folds_csv.with_name(".folds.lock"), f"{paths.folds_csv} (folds)"):
        _timed("folds", write_folds, load_index(paths.cache), paths.folds_csv, force=a.force)


def _experiment(a):
    """The config of --config with its overrides, checked against the registries."""
    from .tasks import load_experiment

    overrides = list(a.overrides) + ([f"train.seed={a.seed}"] if getattr(a, "seed", None) is not None else [])
    if getattr(a, "pseudo", None) is not None:  # the second round: its own run names, so the first round's runs stay
        from .config import ConfigError

        if not 0.5 < a.pseudo < 1:
            raise ConfigError(f"--pseudo: expected a confidence threshold in (0.5, 1), got {a.pseudo}")
        overrides += [f"name={load_experiment(a.config, overrides).name}_pl", f"train.pseudo_threshold={a.pseudo}"]
    return load_experiment(a.config, overrides)


def cmd_preflight(a, paths: Paths) -> int:
    from .preflight import preflight, table
    from .tasks import load_experiment

    configs = [(Path(c).stem, load_experiment(c)) for c in a.config]
    checks = preflight(configs, paths)
    print(table(checks, paths), flush=True)
    problems = [p for c in checks for p in c.problems]
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print(f"preflight: {len(checks)} config(s) ready")
    return 2 if problems else 0


def cmd_stain_gan(a, paths: Paths):
    from .data.cache import Cache, check_inputs
    from .stain_gan import train_stain_gan

    cfg = _experiment(a)
    if cfg.aug.stain_norm != "gan":
        print(f"stain-gan: {cfg.name} does not use aug.stain_norm=gan: nothing to train")
        return
    check_inputs(paths.input, paths.cache)
    _timed("stain-gan", train_stain_gan, cfg, Cache.open(paths.cache), paths, force=a.force)


def cmd_embed(a, paths: Paths):
    from accelerate import Accelerator

    from .data.cache import Cache, check_inputs
    from .tasks import make_task

    cfg = _experiment(a)
    check_inputs(paths.input, paths.cache)
    task = make_task(cfg, Cache.open(paths.cache), paths, Accelerator())
    store = _timed("embed", task.stored_data)
    print(f"embed: {cfg.name}: " + (f"features in {store.path}" if store is not None else
                                    f"a {task.kind} task reads images from the cache: nothing to embed"))


def cmd_train(a, paths: Paths):
    from .config import ConfigError
    from .data.cache import check_inputs
    from .data.folds import read_folds
    from .runs import RunDir
    from .train import train_fold

    cfg = _experiment(a)
    check_inputs(paths.input, paths.cache)
    known = sorted(int(f) for f in read_folds(paths.folds_csv)["fold"].unique())
    try:
        folds = known if a.fold == "all" else [int(f) for f in a.fold.split(",")]
    except ValueError:
        raise ConfigError(f"--fold {a.fold}: expected 'all' or comma-separated held-out centers {known}") from None
    if set(folds) - set(known):
        raise ConfigError(f"--fold {a.fold}: folds are the labelled centers {known}")
    for fold in folds:
        run = RunDir.of(paths.runs, cfg.name, cfg.train.seed, int(fold))
        _timed(f"train {run.name}", train_fold, cfg, paths, run, force=a.force)


def cmd_infer(a, paths: Paths):
    from .data.cache import check_inputs
    from .predict import infer_all
    from .runs import find_runs

    check_inputs(paths.input, paths.cache)
    _timed("infer", infer_all, find_runs(paths.runs), paths, force=a.force, adabn=a.adabn)


def cmd_stack(a, paths: Paths):
    from .config import ConfigError, tracker_names
    from .data.cache import check_inputs
    from .runs import find_runs
    from .stack import run_stack

    if not (a.prior == 0 or 0 < a.prior < 1):
        raise ConfigError(f"--prior {a.prior}: expected a share in (0, 1), or 0 for never")
    trackers = tracker_names(a.log_with)  # checked before the work
    check_inputs(paths.input, paths.cache)
    _timed("stack", run_stack, find_runs(paths.runs), paths.folds_csv, paths.stack, paths.cache, seed=a.seed,
           prior=a.prior or None)
    if trackers:
        from .tracking import log_stack

        log_stack(paths.stack, trackers, paths.root)


def cmd_submit(a, paths: Paths):
    from .submit import write_submission

    _timed("submit", write_submission, paths.stack / "test_scores.csv", paths.input / "test.h5", paths.submissions,
           allow_degenerate=a.allow_degenerate, cache_dir=paths.cache, kaggle=a.kaggle)


def cmd_report(a, paths: Paths):
    from .report import write_report
    from .runs import find_runs

    write_report(find_runs(paths.runs), paths.stack, paths.report, paths.cache, paths.input)


def cmd_score(a, paths: Paths):
    """Accuracy of the current submission against a labels file (demo and offline benchmarks only)."""
    import pandas as pd

    from .metrics import accuracy

    sub = pd.read_csv(paths.submissions / "submission.csv")
    try:
        labels = pd.read_csv(a.labels)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
        raise FileNotFoundError(f"{a.labels}: not a CSV file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [c for c in ("ID", "label") if c not in labels.columns]
    if missing:
        raise FileNotFoundError(f"{a.labels}: no column {' or '.join(missing)} (columns: {', '.join(map(str, labels.columns))}); "
                                "a labels file has the columns ID,label")
    merged = sub.merge(labels[["ID", "label"]], on="ID", how="inner")
    if len(merged) != len(sub):
        raise FileNotFoundError(f"{a.labels}: labels for {len(merged)} of {len(sub)} submission ids")
    acc = accuracy(merged["label"], merged["Pred"])
    print(f"score: test accuracy {acc:.4f} on {len(merged)} patches ({a.labels})")


def cmd_recipes(a, paths: Paths):
    """The foundation-model registry as a table (the README's is generated from it)."""
    from .models.foundation import RECIPES

    print("| recipe | model | hub id | library | embedding | dim | input | mean / std | precision | gated | licence |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RECIPES.values():
        crop = f", crop {r.crop_pct}" if r.crop_pct < 1 else ""
        library = f"{r.library} + `{r.adapter}` adapter" if r.adapter else r.library
        print(f"| `{r.name}` | [{r.title}]({r.card}) | `{r.hub_id}` | {library} | {r.embedding} | {r.embed_dim} | "
              f"{r.input_size} {r.interpolation}{crop} | {r.mean} / {r.std} | {r.precision} | "
              f"{'yes' if r.gated else 'no'} | {r.licence} |")


def cmd_fm_standin(a, paths: Paths):
    from .models.foundation import RECIPES, resolve_recipe
    from .models.foundation.standin import standin_overrides, write_standin

    names = list(RECIPES) if a.recipe == "all" else a.recipe.split(",")
    for name in names:
        recipe = resolve_recipe(name)
        folder = write_standin(recipe, Path(a.out), layout=a.layout)
        extra = standin_overrides(recipe)
        print(f"fm-standin: {recipe.title} stand-in (RANDOM weights, not the real model) in {folder}"
              + (f"; load it with model.recipe_overrides.create_kwargs={extra['create_kwargs']}" if extra else ""))


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="histoshift", description=__doc__, epilog=_stage_table(), formatter_class=raw)
    p.add_argument("--root", default=".", help="folder holding input/, folds/, work/, submissions/")
    sub = p.add_subparsers(dest="stage", required=True, metavar="<stage>")

    def stage(name: str) -> argparse.ArgumentParser:
        st = STAGES[name]
        return sub.add_parser(name, help=st.help, description=st.description(), formatter_class=raw)

    s = stage("demo-data")
    s.add_argument("--out", default=None, help="folder for the h5 files (default: <root>/input)")
    s.add_argument("--per-center", type=int, default=160, help="patches per labelled center (five centers)")
    s.add_argument("--test-size", type=int, default=240, help="patches of the test center")
    s.add_argument("--seed", type=_seed, default=0, help="random seed of the generated images")
    s.set_defaults(fn=cmd_demo_data)

    s = stage("prepare")
    s.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    s.add_argument("--verify", action="store_true",
                   help="also compare the files' bytes with the digests taken when the cache was built (a same-size, "
                        "same-time edit is caught; infer.sh runs it before every submission)")
    s.add_argument("--max-black", type=int, default=200, help="aberrant above this many pure-black pixels")
    s.add_argument("--max-white-frac", type=float, default=0.9, help="aberrant above this share of white pixels")
    s.add_argument("--centers", default="train=0,3,4;val=1;test=2",
                   help="the centers each file may hold (a patch elsewhere is refused); 'any' checks nothing")
    s.add_argument("--workers", type=int, default=0, help="HDF5 reader processes (0: one per core, at most 8)")
    s.set_defaults(fn=cmd_prepare)

    s = stage("folds")
    s.add_argument("--force", action="store_true", help="replace a differing folds.csv (the old one is kept)")
    s.set_defaults(fn=cmd_folds)

    s = stage("preflight")
    s.add_argument("--config", required=True, action="append", help="a config about to run (repeat for several)")
    s.set_defaults(fn=cmd_preflight)

    s = stage("stain-gan")
    s.add_argument("--config", required=True, help="one experiment's YAML file (configs/*.yaml)")
    s.add_argument("--force", action="store_true", help="train again (the previous generator is kept aside)")
    s.add_argument("overrides", nargs="*", help="typed overrides, e.g. stain_gan.steps=500 stain_gan.sources=[0]")
    s.set_defaults(fn=cmd_stain_gan)

    s = stage("embed")
    s.add_argument("--config", required=True, help="one experiment's YAML file (configs/*.yaml)")
    s.add_argument("overrides", nargs="*", help="typed overrides, e.g. train.feature_hed_views=4")
    s.set_defaults(fn=cmd_embed)

    s = stage("train")
    s.add_argument("--config", required=True, help="one experiment's YAML file (configs/*.yaml)")
    s.add_argument("--fold", default="all", help="'all' or comma-separated held-out centers")
    s.add_argument("--seed", type=_seed, default=None, help="shorthand for train.seed=N")
    s.add_argument("--force", action="store_true", help="retrain finished runs (the old ones are kept)")
    s.add_argument("--pseudo", type=float, default=None, metavar="T",
                   help="one round of pseudo-labelling after a first train/infer/stack: the config again as "
                        "NAME_pl, with the test patches the ensemble is at least T sure of (train.pseudo_threshold)")
    s.add_argument("overrides", nargs="*", help="typed overrides, e.g. optim.lr=3e-4 train.epochs=5")
    s.set_defaults(fn=cmd_train)

    s = stage("infer")
    s.add_argument("--force", action="store_true", help="predict again even when the TTA files are current")
    s.add_argument("--adabn", action="store_true",
                   help="also predict with batch-norm statistics re-estimated on each target center (AdaBN); "
                        "the stack stage keeps them unless leave-one-center-out shows they hurt")
    s.set_defaults(fn=cmd_infer)

    s = stage("stack")
    s.add_argument("--seed", type=_seed, default=0, help="LightGBM's seed")
    s.add_argument("--prior", type=float, default=0.5, metavar="SHARE",
                   help="the test center's known share of tumour patches (0.5: balanced); thresholding to it is "
                        "scored leave-one-center-out and used only where it helps (0: never)")
    s.add_argument("--log-with", default="", metavar="NAMES",
                   help="experiment trackers for the comparison table, e.g. tensorboard (Accelerate's names, comma-"
                        "separated; files in work/stack/tracker/)")
    s.set_defaults(fn=cmd_stack)

    s = stage("submit")
    s.add_argument("--allow-degenerate", action="store_true",
                   help="write a submission that predicts one class for every test patch (refused otherwise)")
    s.add_argument("--kaggle", default=None, metavar="SLUG",
                   help="also upload it to this Kaggle competition with the official client, its message built "
                        "from the lineage; the local file is placed only once Kaggle took it (never without this)")
    s.set_defaults(fn=cmd_submit)

    s = stage("report")
    s.set_defaults(fn=cmd_report)

    s = stage("recipes")
    s.set_defaults(fn=cmd_recipes)

    s = stage("fm-standin")
    s.add_argument("--recipe", default="all", help="recipe name(s), comma-separated, or 'all'")
    s.add_argument("--out", required=True, help="a Hugging Face hub cache folder (point HF_HUB_CACHE at it) or, with "
                                                "--layout dir, the folder for the repo's files")
    s.add_argument("--layout", choices=("cache", "dir"), default="cache",
                   help="cache: hub-cache layout (models--org--name/snapshots/...); dir: the repo's files in --out")
    s.set_defaults(fn=cmd_fm_standin)

    s = stage("score")
    s.add_argument("--labels", required=True, help="CSV with columns ID,label")
    s.set_defaults(fn=cmd_score)
    return p


def _seed(text: str) -> int:
    """A seed option: a non-negative integer (numpy's generators refuse others with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _user_errors() -> tuple:
    """The exceptions that are refusals: one line naming the file, id or key, exit 2 (no traceback)."""
    from .config import ConfigError
    from .data.folds import FoldsError
    from .data.h5_reader import InputError
    from .features import FeatureError
    from .lineage import StaleError
    from .models.foundation import RecipeError
    from .models.weights import WeightsError
    from .tta import PredictionError
    from .safeio import DiskError, LockError
    from .stack import StackError
    from .kaggle_upload import UploadError
    from .submit import SubmissionError

    return (UploadError, ConfigError, InputError, FeatureError, FoldsError, StaleError, WeightsError, RecipeError, PredictionError, StackError,
            SubmissionError, DiskError, LockError, FileExistsError, FileNotFoundError)


def _os_error_line(e: OSError) -> str | None:
    """A one-line message for the OS errors a user can cause (full disk, read-only or forbidden folder)."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: disk full ({e.strerror}); free some space and run the stage again (it resumes)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror}; this stage needs to write there (check the folder's permissions)"
    return None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if Path(a.root).exists() and not Path(a.root).is_dir():
        print(f"error: --root {a.root}: is a file, not a folder (the root holds input/, work/, folds/, submissions/)",
              file=sys.stderr)
        return 2
    try:
        code = a.fn(a, Paths(Path(a.root)))
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = _os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # a stage returns an exit status (preflight) or nothing
