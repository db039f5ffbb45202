"""Stage `report`: a markdown summary and plots of every run and of the ensemble choice.

work/report/report.md      per-run held-out accuracy/AUC, combiner comparison, stage outputs
work/report/curves.png     held-out accuracy and training loss per epoch, one line per run
work/report/combiners.png  leave-one-center-out accuracy of mean / rank / stack per center
work/report/per_center.png accuracy and AUC per held-out center of the mean ensemble (out of fold)
work/report/roc.png        ROC curve per held-out center and a reliability diagram (mean ensemble)
work/report/feature_map.png  t-SNE of a fold model's backbone features for a sample of every center,
                           coloured by center and by label; beside it the same fold trained without a
                           domain head (ERM) when such a run exists
The data overview (sample patches and stain per center) is written by prepare: work/cache/overview.png.
The tables and figures are plots.py's.
"""
from __future__ import annotations

from pathlib import Path

from . import Stage

STAGE = Stage("markdown summary and plots of the runs and combiners",
              "work/runs/, work/stack/, work/cache/overview.png",
              "work/report/: report.md, curves.png, combiners.png, per_center.png, roc.png; feature_map.png "
              "when a fine-tuned run is present",
              flow="work/runs/, work/stack/ -> work/report/")


def arguments(p) -> None:
    pass


def run(a, paths) -> None:
    from ..runs import find_runs

    write_report(find_runs(paths.runs), paths.stack, paths.report, paths.cache, paths.input)


def check_lineage(runs: list, stack_dir: Path, cache_dir: Path, input_dir: Path | None) -> None:
    """The rules of the other stages, before anything is drawn: the inputs are the cache's, every run was
    trained on this cache, and the stack's choice was made from this cache and these checkpoints."""
    from ..data.cache import Cache, check_inputs
    from ..lineage import digest_file
    from ..stack.folder import StackDir

    if input_dir is not None:
        check_inputs(input_dir, cache_dir)
    cache = Cache.open(cache_dir)
    for run in runs:
        run.check_inputs(cache.digests)
    stack = StackDir(Path(stack_dir))
    if stack.choice() is not None:
        stack.require_current(cache.id, {r.name: digest_file(r.checkpoint) for r in runs}, "before the report")


def write_report(runs: list, stack_dir: Path, out_dir: Path, cache_dir: Path | None = None,
                 input_dir: Path | None = None) -> Path:
    """The report (report.md and its plots); refused, one line, when its inputs are stale (`check_lineage`)."""
    import pandas as pd

    from ..plots import combiners, curves, ensemble_plots, feature_map, markdown_table, run_table, sparse_heads
    from ..safeio import write_text
    from ..stack.combine import calibration_means
    from ..stack.folder import StackDir

    if cache_dir is not None:
        check_lineage(runs, stack_dir, cache_dir, input_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Run report", ""]
    if cache_dir is not None and (Path(cache_dir) / "overview.png").exists():
        # a link relative to the report when both live under work/ (the stages' layout), else absolute
        where = (
            Path("..") / Path(cache_dir).name if Path(cache_dir).parent == out_dir.parent else Path(cache_dir).resolve()
        )
        lines += ["## Data (written by prepare)", "", f"![sample patches per center]({where / 'overview.png'})", "",
                  f"![stain per center]({where / 'colours.png'})", ""]
    if runs:
        table = run_table(runs)
        curves(runs, out_dir / "curves.png")
        lines += ["## Fold models (held-out center, plain view, out of fold)", "",
                  markdown_table(table),
                  "", "![curves](curves.png)", ""]
        sparse = sparse_heads(runs)
        if len(sparse):
            lines += ["## Sparse heads (model.head_l1): the dimensions they keep", "", markdown_table(sparse), "",
                      "A stable signature keeps the same dimensions whichever center is held out (Jaccard near 1).", ""]
        notes = feature_map(runs, cache_dir, out_dir / "feature_map.png") if cache_dir is not None else []
        if notes:
            lines += ["## Backbone features of every center (t-SNE)", "", *[f"- {n}" for n in notes], "",
                      "![feature map](feature_map.png)", ""]
    comparison_csv = Path(stack_dir) / "comparison.csv"
    if comparison_csv.exists():
        comparison = pd.read_csv(comparison_csv)
        choice = StackDir(Path(stack_dir)).require_choice("run the stack stage before the report")
        pivot = comparison.pivot(index="center", columns="method", values="accuracy")
        pivot.loc["mean"] = pivot.mean()
        combiners(comparison, out_dir / "combiners.png")
        centers = ensemble_plots(pd.read_csv(Path(stack_dir) / "oof_features.csv"), out_dir)
        lines += [
            "## Ensemble: combiners, leave one center out (8-view TTA features)",
            "",
            markdown_table(pivot.reset_index()),
            "",
            *(
                [
                    "Calibration of each combiner's tumour probability, mean over the held-out centers (Brier "
                    "score and expected calibration error, 10 bins; lower is better; `rank` gives an order, not a "
                    "probability):",
                    "",
                    markdown_table(pd.DataFrame([{"method": m, **v} for m, v in calib.items()])),
                    "",
                ]
                if (calib := calibration_means(comparison))
                else []
            ),
            f"Chosen for the test center: **{choice.method}** over {len(choice.members)} members "
            f"({', '.join(choice.members)}), by the {choice.rule_line()}.",
            *([f"Between the prediction sets: {choice.evidence_line()}."] if choice.adapted_vs_plain else []),
            *([f"{choice.fourier_line()}."] if choice.fourier_vs_pick else []),
            *(
                [
                    "",
                    "Adapted predictions (per fold model, test center):",
                    "",
                    *[f"- {line}" for line in choice.adaptation_lines()],
                    "",
                ]
                if choice.adaptations
                else []
            ),
            *(
                [
                    f"Prior matching (threshold at {p['share']:.0%} positive): leave-one-center-out "
                    f"{p['loco_with']:.4f} "
                    f"against {p['loco_without']:.4f} without: {'used' if p['used'] else 'not used'}."
                ]
                if (p := choice.prior_matching)
                else []
            ),
            *(
                [
                    f"Picked their epoch or averaging window on the held-out center (train.early_stop_patience or "
                    f"train.average=swad; their out-of-fold "
                    f"accuracies are optimistic): {', '.join(choice.heldout_selected)}."
                ]
                if choice.heldout_selected
                else []
            ),
            "",
            "![combiners](combiners.png)",
            "",
            "## Mean ensemble per held-out center (out of fold)",
            "",
            markdown_table(centers),
            "",
            "![per center](per_center.png)",
            "",
            "![ROC and calibration](roc.png)",
            "",
        ]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines))
    print(f"report: wrote {path}")
    return path
