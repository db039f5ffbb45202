"""The tables and figures of the `report` stage (stages/report.py lists the files and writes report.md around
them): run tables, curves, the sparse heads' signatures, the feature map (t-SNE by center and label), the
combiners, the mean ensemble per held-out center (ROC, reliability)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .paths import Paths  # noqa: E402
from .runs import RunDir  # noqa: E402
from .safeio import write_figure  # noqa: E402


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def run_table(runs: list[RunDir]) -> pd.DataFrame:
    rows = []
    for run in runs:
        s = json.loads(run.summary.read_text())
        rows.append({"run": run.name, "method": run.cfg.method(), "held-out center": run.fold,
                     "accuracy": s["heldout_accuracy"],
                     "auc": s["heldout_auc"], "brier": s.get("heldout_brier", float("nan")),
                     "ece": s.get("heldout_ece", float("nan")), "train seconds": s["seconds"]})
    return pd.DataFrame(rows)


def jaccard(sets: list[set]) -> float:
    """Mean pairwise Jaccard overlap |A & B| / |A | B| of the sets (1.0 for fewer than two)."""
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.mean([len(a & b) / max(len(a | b), 1) for a, b in pairs])) if pairs else 1.0


def sparse_heads(runs: list[RunDir]) -> pd.DataFrame:
    """Per sparse-probe config and seed: dimensions kept per fold (of how many), the mean pairwise Jaccard
    overlap of the kept sets across the leave-one-center-out folds, and the mean held-out accuracy."""
    rows = []
    groups: dict[str, list[dict]] = {}
    for run in runs:
        s = json.loads(run.summary.read_text())
        if "kept_dims" in s:
            groups.setdefault(run.model_name, []).append(s)
    for name, summaries in sorted(groups.items()):
        summaries.sort(key=lambda s: s["fold"])
        rows.append({"config": name, "dims": summaries[0]["dims"],
                     "kept per fold": ", ".join(f"{s['fold']}: {len(s['kept_dims'])}" for s in summaries),
                     "Jaccard across folds": round(jaccard([set(s["kept_dims"]) for s in summaries]), 3),
                     "held-out accuracy": round(float(np.mean([s["heldout_accuracy"] for s in summaries])), 4)})
    return pd.DataFrame(rows)


def curves(runs: list[RunDir], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        m = pd.read_json(run.metrics, lines=True)
        axes[0].plot(m["epoch"], m["heldout_acc"], marker="o", label=run.name)
        axes[1].plot(m["epoch"], m["train_loss"], marker="o", label=run.name)
    axes[0].set(title="held-out center accuracy (plain view)", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="training loss", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)


MAP_PER_CENTER = 150  # patches per center in the feature map


def map_pair(runs: list[RunDir]) -> list[RunDir]:
    """The fine-tuned run the feature map shows (the first DANN run on its lowest fold) and, when one
    exists, an ERM run of the same backbone, seed and fold: the same fold without the domain head."""
    cfgs = {r: r.cfg for r in runs}
    tuned = [r for r in runs if cfgs[r].model.fine_tuned]  # backbone features exist for fine-tuned models only
    dann = sorted((r for r in tuned if cfgs[r].algorithm.name == "dann"), key=lambda r: (r.fold, r.name))
    if not dann:
        return tuned[:1]
    first = dann[0]
    erm = [r for r in tuned if cfgs[r].algorithm.name == "erm" and r.fold == first.fold
           and r.path.parent.name == first.path.parent.name and cfgs[r].model.backbone == cfgs[first].model.backbone]
    return [first] + erm[:1]


def center_predictability(features: np.ndarray, centers: np.ndarray) -> float:
    """3-fold accuracy of a logistic regression telling the center from the features (chance: 1/centers)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    return float(cross_val_score(clf, features, centers, cv=3).mean())


def feature_map(runs: list[RunDir], cache_dir: Path, path: Path) -> list[str]:
    """t-SNE of backbone features (plain view) for up to MAP_PER_CENTER non-aberrant patches per center."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from accelerate import Accelerator

    from .data.cache import Cache
    from .tasks import run_task

    chosen = map_pair(runs)
    if not chosen:
        return []
    cache = Cache.open(cache_dir)
    ok = cache.index[~cache.index["aberrant"]]
    sample = pd.concat([p.sample(min(len(p), MAP_PER_CENTER), random_state=0) for _, p in ok.groupby("center")])
    fig, axes = plt.subplots(len(chosen), 2, figsize=(10, 4.3 * len(chosen)), squeeze=False)
    notes, acc = [], Accelerator()
    for row, run in enumerate(chosen):
        cfg = run.cfg
        task, model = run_task(run, cache, Paths.of_cache(cache_dir), acc)
        feats = task.features(model, sample)
        what = f"{run.name} ({cfg.algorithm.name.upper()}, held-out center {run.fold})"
        if not np.isfinite(feats).all():  # a diverged model (infer refuses it too): no map, one note
            notes.append(f"{what}: its features are not finite (the model diverged: retrain it with a lower optim.lr); "
                         "no map")
            continue
        reduced = PCA(n_components=min(50, feats.shape[1], len(feats) - 1), random_state=0).fit_transform(feats)
        xy = TSNE(n_components=2, init="pca", perplexity=min(30, (len(feats) - 1) / 3), random_state=0).fit_transform(
            reduced
        )
        score = center_predictability(feats, sample["center"].to_numpy())
        notes.append(f"{what}: a linear probe tells the center from these features with {score:.1%} accuracy "
                     f"(3-fold; chance {1 / sample['center'].nunique():.0%})")
        for center, part in sample.reset_index(drop=True).groupby("center"):
            axes[row, 0].scatter(*xy[part.index].T, s=5, alpha=0.6, label=f"center {center}")
        for label, name, colour in (
            (0, "normal", "tab:blue"),
            (1, "tumour", "tab:red"),
            (-1, "unlabelled (test)", "0.75"),
        ):
            sel = sample["label"].to_numpy() == label
            axes[row, 1].scatter(*xy[sel].T, s=5, alpha=0.6, c=colour, label=name)
        axes[row, 0].set_title(f"{what}\nby center (linear probe {score:.0%})", fontsize=9)
        axes[row, 1].set_title("by label", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([]), ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    write_figure(fig, path, dpi=100)
    plt.close(fig)
    return notes


def combiners(comparison: pd.DataFrame, path: Path) -> None:
    comparison = comparison[~comparison["prior"]]  # the prior-matched variants: in the table only
    table = comparison.pivot(index="center", columns="method", values="accuracy")
    ax = table.plot.bar(figsize=(7, 4), rot=0)
    low = max(0.0, float(table.min().min()) - 0.05)
    ax.set(title="leave-one-center-out accuracy of the combiners", xlabel="held-out center",
           ylabel="accuracy", ylim=(low, 1.0))
    ax.figure.tight_layout()
    write_figure(ax.figure, path, dpi=110)
    plt.close(ax.figure)


def ensemble_plots(oof: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Per-center accuracy/AUC, ROC curves and calibration of the mean ensemble's out-of-fold scores."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from .metrics import calibration_bins, per_center

    means = [c for c in oof.columns if c.endswith("__mean")]
    table = oof[["id", "center", "label"]].copy()
    table["logit"] = oof[means].mean(axis=1)
    centers = per_center(table)
    ax = centers.set_index("center")[["accuracy", "auc"]].plot.bar(figsize=(7, 4), rot=0)
    ax.set(title="mean ensemble, held-out centers (out of fold)", xlabel="held-out center",
           ylim=(max(0.0, float(centers[["accuracy", "auc"]].min().min()) - 0.05), 1.0))
    ax.figure.tight_layout()
    write_figure(ax.figure, out_dir / "per_center.png", dpi=110)
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
    table["prob"] = prob
    axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
    for center, part in table.groupby("center"):  # a reliability diagram per held-out center
        points = calibration_bins(part["label"], part["prob"])
        axes[1].plot(points["mean_prob"], points["share"], marker="o", label=f"center {center}")
    axes[1].set(title="reliability per held-out center", xlabel="mean predicted tumour probability",
                ylabel="observed tumour share")
    axes[1].legend()
    fig.tight_layout()
    write_figure(fig, out_dir / "roc.png", dpi=110)
    plt.close(fig)
    return centers
