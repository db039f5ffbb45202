"""Stage `report`: a markdown summary and plots of every run and of the ensemble choice.

work/report/report.md      per-run held-out accuracy/AUC, combiner comparison, stage outputs
work/report/curves.png     held-out accuracy and training loss per epoch, one line per run
work/report/combiners.png  leave-one-center-out accuracy of mean / rank / stack per center
work/report/per_center.png accuracy and AUC per held-out center of the mean ensemble (out of fold)
work/report/roc.png        ROC curve per held-out center and a reliability diagram (mean ensemble)
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .runs import RunDir  # noqa: E402
from .safeio import write_text  # noqa: E402
from .stack import evidence_line  # noqa: E402


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _run_table(runs: list[RunDir]) -> pd.DataFrame:
    rows = []
    for run in runs:
        s = json.loads(run.summary.read_text())
        rows.append({"run": run.name, "held-out center": run.fold, "accuracy": s["heldout_accuracy"],
                     "auc": s["heldout_auc"], "train seconds": s["seconds"]})
    return pd.DataFrame(rows)


def _curves(runs: list[RunDir], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        m = pd.read_json(run.metrics, lines=True)
        axes[0].plot(m["epoch"], m["heldout_acc"], marker="o", label=run.name)
        axes[1].plot(m["epoch"], m["train_loss"], marker="o", label=run.name)
    axes[0].set(title="held-out center accuracy (plain view)", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="training loss", xlabel="epoch", ylabel="loss")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _combiners(comparison: pd.DataFrame, path: Path) -> None:
    table = comparison.pivot(index="center", columns="method", values="accuracy")
    ax = table.plot.bar(figsize=(7, 4), rot=0)
    low = max(0.0, float(table.min().min()) - 0.05)
    ax.set(title="leave-one-center-out accuracy of the combiners", xlabel="held-out center",
           ylabel="accuracy", ylim=(low, 1.0))
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)


def _ensemble_plots(oof: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Per-center accuracy/AUC, ROC curves and calibration of the mean ensemble's out-of-fold scores."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from .metrics import per_center

    means = [c for c in oof.columns if c.endswith("__mean")]
    table = oof[["id", "center", "label"]].copy()
    table["logit"] = oof[means].mean(axis=1)
    centers = per_center(table)
    ax = centers.set_index("center")[["accuracy", "auc"]].plot.bar(figsize=(7, 4), rot=0)
    ax.set(title="mean ensemble, held-out centers (out of fold)", xlabel="held-out center",
           ylim=(max(0.0, float(centers[["accuracy", "auc"]].min().min()) - 0.05), 1.0))
    ax.figure.tight_layout()
    ax.figure.savefig(out_dir / "per_center.png", dpi=110)
    plt.close(ax.figure)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    prob = 1 / (1 + np.exp(-table["logit"].to_numpy()))
    for center, part in table.groupby("center"):
        if part["label"].nunique() == 2:
            fpr, tpr, _ = roc_curve(part["label"], part["logit"])
            axes[0].plot(fpr, tpr, label=f"center {center}")
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set(title="ROC per held-out center", xlabel="false positive rate", ylabel="true positive rate")
    axes[0].legend()
    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(prob, bins) - 1, 0, 9)
    centres, freq = [], []
    for b in range(10):
        sel = which == b
        if sel.any():
            centres.append(prob[sel].mean())
            freq.append(table["label"].to_numpy()[sel].mean())
    axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[1].plot(centres, freq, marker="o")
    axes[1].set(title="calibration (all held-out centers)", xlabel="mean predicted tumour probability",
                ylabel="observed tumour share")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    return centers


def write_report(runs: list[RunDir], stack_dir: Path, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Run report", ""]
    if runs:
        table = _run_table(runs)
        _curves(runs, out_dir / "curves.png")
        lines += ["## Fold models (held-out center, plain view, out of fold)", "",
                  markdown_table(table),
                  "", "![curves](curves.png)", ""]
    comparison_csv = Path(stack_dir) / "comparison.csv"
    if comparison_csv.exists():
        comparison = pd.read_csv(comparison_csv)
        choice = json.loads((Path(stack_dir) / "choice.json").read_text())
        pivot = comparison.pivot(index="center", columns="method", values="accuracy")
        pivot.loc["mean"] = pivot.mean()
        _combiners(comparison, out_dir / "combiners.png")
        centers = _ensemble_plots(pd.read_csv(Path(stack_dir) / "oof_features.csv"), out_dir)
        lines += ["## Ensemble: combiners, leave one center out (8-view TTA features)", "",
                  markdown_table(pivot.reset_index()), "",
                  f"Chosen for the test center: **{choice['method']}** over {len(choice['members'])} members "
                  f"({', '.join(choice['members'])}).", *([f"Between the prediction sets: {evidence_line(choice['adabn_vs_plain'])}."]
                    if choice.get("adabn_vs_plain") else []),
                  "", "![combiners](combiners.png)", "",
                  "## Mean ensemble per held-out center (out of fold)", "", markdown_table(centers), "",
                  "![per center](per_center.png)", "", "![ROC and calibration](roc.png)", ""]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines))
    print(f"report: wrote {path}")
    return path
