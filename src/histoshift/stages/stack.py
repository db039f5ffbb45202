"""Stage `stack`: score mean logits, rank average and a LightGBM stacker leave one center out, pick one, score
the test center (the computations, the rules and the decision: the stack package; its folder: stack/folder.py)."""
from __future__ import annotations

from pathlib import Path

from ..stack.folder import CHOICE
from . import Stage, seed, timed

STAGE = Stage("score mean logits, rank average and a LightGBM stacker leave one center out, pick one, "
              "score the test center",
              "the runs' tta_*.csv, folds/folds.csv, work/cache/",
              f"work/stack/: oof_features.csv, test_features.csv, comparison.csv, test_scores.csv, {CHOICE}",
              flow="work/runs/.../tta_*.csv, folds/ -> work/stack/")


def arguments(p) -> None:
    p.add_argument("--seed", type=seed, default=0, help="LightGBM's seed")
    p.add_argument("--prior", type=float, default=0.5, metavar="SHARE",
                   help="the test center's known share of tumour patches (0.5: balanced); thresholding to it is "
                        "scored leave-one-center-out and used only where it helps (0: never)")
    # the names, not the registry: importing rules.py would import torch and LightGBM into every stage's --help
    p.add_argument("--rule", default=None, metavar="NAME",
                   help="how the prediction set is chosen (rules.py, docs/design.md): loco, margin (the default: "
                        "adapted unless plain is better leave one center out by more than a point beyond doubt), "
                        "agreement, entropy, rank_both or adapted")
    p.add_argument("--log-with", default="", metavar="NAMES",
                   help="experiment trackers for the comparison table, e.g. tensorboard (Accelerate's names, comma-"
                        "separated; files in work/stack/tracker/)")


def _rules() -> dict:
    from ..stack.rules import RULES
    return RULES


def _default() -> str:
    from ..stack.rules import DEFAULT
    return DEFAULT


def run(a, paths) -> None:
    from ..config import ConfigError, tracker_names
    from ..data.cache import check_inputs
    from ..runs import find_runs
    from ..stack.folder import StackDir

    if not (a.prior == 0 or 0 < a.prior < 1):
        raise ConfigError(f"--prior {a.prior}: expected a share in (0, 1), or 0 for never")
    rule = a.rule or _default()
    if rule not in _rules():
        raise ConfigError(f"--rule {rule}: not a choice rule; one of {', '.join(_rules())}")
    trackers = tracker_names(a.log_with)  # checked before the work
    check_inputs(paths.input, paths.cache)
    timed("stack", run_stack, find_runs(paths.runs), paths.folds_csv, paths.stack, paths.cache, seed=a.seed,
          prior=a.prior or None, rule=rule)
    if trackers:
        from ..tracking import log_stack

        stack = StackDir(paths.stack)
        log_stack(stack.path, stack.require_choice("run the stack stage"), trackers, paths.root)


def run_stack(runs: list, folds_csv: Path, out_dir: Path, cache_dir: Path, seed: int = 0,
              prior: float | None = 0.5, rule: str | None = None):
    """`prior`: the test center's known positive share (0.5: exactly balanced), tried as a threshold
    leave-one-center-out and used when it helps there; None: never. `rule`: the choice rule (rules.py; None: its
    default). Returns the StackChoice written."""
    from ..data.cache import Cache
    from ..safeio import Lock
    from ..stack.folder import StackDir

    stack = StackDir(Path(out_dir))
    with Lock(stack.lock, f"the stack folder {stack.path}"):
        return _run_stack(runs, folds_csv, stack, Cache.open(cache_dir), seed, prior, rule or _default())


def ensemble(runs: list, members: list[str]) -> dict:
    """Per config in the ensemble: its seeds and folds (every member has every fold; the submission's message)."""
    out: dict = {}
    for r in runs:
        if r.model_name in members:
            entry = out.setdefault(r.config_name, {"seeds": [], "folds": []})
            entry["seeds"], entry["folds"] = sorted({*entry["seeds"], r.seed}), sorted({*entry["folds"], r.fold})
    return out


def _run_stack(runs: list, folds_csv: Path, stack, cache, seed: int, prior: float | None, rule: str):
    import pandas as pd

    from ..lineage import digest_file
    from ..safeio import write_csv
    from ..stack.choice import compare_prediction_sets, decide
    from ..stack.combine import calibration_means, comparison_table
    from ..stack.folder import StackChoice
    from ..stack.sets import ADAPTED

    stack.path.mkdir(parents=True, exist_ok=True)
    features, comparison, hits = compare_prediction_sets(runs, folds_csv, cache, seed, prior)
    written = comparison_table(comparison)  # the typed labels as text and columns
    table = written.pivot(index="center", columns="method", values="accuracy")
    table.loc["mean"] = table.mean()
    d = decide(features, comparison, hits, prior, seed, rule)
    names, evidence, matched = d.names, d.evidence, d.prior_matching
    scores = pd.DataFrame({"id": d.test["id"], "score": d.score, "pred": d.pred})
    choice = StackChoice(
        members=names, shipped=d.shipped, ensemble=ensemble(runs, names),
        loco_accuracy={m: float(table.loc["mean", m]) for m in table.columns},
        # calibration of each combiner's tumour probability, mean over held-out centers (rank: none)
        loco_calibration=calibration_means(written),
        rule=rule, rule_summary=_rules()[rule].summary, rule_evidence=d.rule_evidence,
        rule_picks={name: str(label) for name, label in d.rule_picks.items()},
        adapted_vs_plain=evidence,  # the paired comparison of the best plain and the best adapted combiner, LOCO
        fourier_vs_pick=d.fourier,  # the best Fourier set against the pick (rules loco and margin)
        # how each fold model's adapted test predictions were made (AdaBN, feature shift, self-training)
        adaptations={r.name: r.tta.adaptation() for r in runs} if ADAPTED in features else None,
        prior_matching=matched, test_positive_rate=float(d.pred.mean()),
        heldout_selected=sorted({r.model_name for r in runs if r.model_name in names
                                 and (r.cfg.train.early_stop_patience > 0 or r.cfg.train.average == "swad")}),
        lineage={"cache": cache.id, "folds": digest_file(folds_csv),
                 "checkpoints": {r.name: digest_file(r.checkpoint) for r in runs}})
    stack.clear_choice()  # scores without a choice are never submitted
    write_csv(stack.oof_features, d.oof, float_format="%.6g")
    write_csv(stack.test_features, d.test, float_format="%.6g")
    write_csv(stack.comparison, written)
    write_csv(stack.test_scores, scores, float_format="%.6g")
    stack.write_choice(choice)  # last: the set is complete
    print("stack: leave-one-center-out accuracy on out-of-fold predictions (rows: held-out center)")
    print(table.round(4).to_string())
    if evidence is not None:
        print(f"stack: {choice.evidence_line()}")
    print(f"stack: {choice.rule_line()}")
    if choice.fourier_vs_pick is not None:
        print(f"stack: {choice.fourier_line()}")
    if matched is not None:
        print(
            f"stack: prior matching ({prior:.0%} predicted positive) leave-one-center-out: {matched['loco_with']:.4f} "
            f"against {matched['loco_without']:.4f} without: {'used' if matched['used'] else 'not used'}"
        )
    if choice.heldout_selected:
        print(
            f"stack: {', '.join(choice.heldout_selected)} picked their epoch or average on the held-out "
            "center (train.early_stop_patience or train.average=swad): their leave-one-center-out accuracies above are "
            "optimistic"
        )
    print(f"stack: using '{choice.method}' for the test center ({len(names)} members: {', '.join(names)})")
    return choice
