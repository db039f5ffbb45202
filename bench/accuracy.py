"""Accuracy ablation on real tissue: PatchCamelyon patches with synthetic pseudo-center stain shifts.

    python bench/accuracy.py [--pcam ../shared/data/pcam] [--train-patches 4500] [--epochs 12]
                             [--rows key|all] [--seeds 0] [--ensemble] [--work DIR]

Builds train/val/test.h5 with ../shared/data/pcam/make_competition_h5.py (real tissue and labels,
synthetic centers: say so when reporting), keeps a random `--train-patches` of the training
centers (stratified by center, the anchors' setting is 4,500), then runs this repository's own
stages (prepare, folds, train, infer, stack: the code paths of train.sh / infer.sh) for each
ablation row, as config overrides of configs/lite0_dann.yaml.

Single-model rows use the fold that holds out center 1, i.e. a model trained on centers 0/3/4 only,
as in ANCHORS.md: val = center 1 (out of fold), test = center 2. Each row is reported with TTA off
(view 0) / on (8-view mean) and, with --rows all, AdaBN on. --ensemble also trains every fold of
the default recipe and reports mean / rank average / stacker on the test center. Several seeds:
mean and range. Prints a markdown table and writes it to bench/results/.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from histoshift.cli import main as cli  # noqa: E402
from histoshift.runs import RunDir, find_runs  # noqa: E402
from histoshift.stack import build_features, predict, fit_stacker  # noqa: E402

BASE = REPO / "configs" / "lite0_dann.yaml"
NO_AUG = ["aug.dihedral=false", "aug.hed_sigma=0", "aug.brightness=0", "aug.contrast=0"]
ROWS = {  # name -> overrides of the default recipe
    "ERM, no augmentation": ["algorithm.name=erm", *NO_AUG],
    "ERM + dihedral": ["algorithm.name=erm", "aug.hed_sigma=0", "aug.brightness=0", "aug.contrast=0"],
    "ERM + dihedral + HED": ["algorithm.name=erm"],
    "DANN + dihedral + HED (default)": [],
}
MORE_ROWS = {
    "DANN, least-squares domain loss": ["algorithm.domain_loss=ls"],
    "DANN + entropy minimisation (0.1)": ["algorithm.entropy_weight=0.1"],
    "DANN + focal loss (gamma 2)": ["algorithm.focal_gamma=2"],
    "DANN, HED sigma 0.1": ["aug.hed_sigma=0.1"],
    "DANN + Reinhard normalisation": ["aug.stain_norm=reinhard"],
    "DANN + Macenko normalisation": ["aug.stain_norm=macenko"],
    "DANN, random init": ["model.weights=none"],
}


def build_data(pcam: Path, root: Path, train_patches: int, seed: int = 0) -> None:
    full = root / "full"
    if not (full / "test.h5").exists():
        subprocess.run([sys.executable, str(pcam / "make_competition_h5.py"), str(full)], check=True)
    inp = root / "input"
    if (inp / "test.h5").exists():
        return
    inp.mkdir(parents=True)
    for name in ("val.h5", "test.h5", "test_labels.csv"):
        shutil.copy(full / name, inp / name)
    rng = np.random.default_rng(seed)
    with h5py.File(full / "train.h5") as src, h5py.File(inp / "train.h5", "w") as dst:
        keys = np.array(list(src.keys()))
        centers = np.array([int(src[k]["metadata"][0]) for k in keys])
        keep = []
        for c in np.unique(centers):  # stratified: the competition's center proportions stay
            ks = keys[centers == c]
            keep += list(rng.choice(ks, size=round(train_patches * len(ks) / len(keys)), replace=False))
        for k in keep:
            src.copy(src[k], dst, name=k)
    print(f"data: {len(keep)} train patches (centers 0/3/4), val/test from PCam valid (real tissue, synthetic centers)")


def run(root: Path, *args) -> None:
    if cli(["--root", str(root), *args]) != 0:
        raise SystemExit(f"stage failed: {args}")


def accuracy(table: pd.DataFrame, views: list[str], labels: pd.Series | None = None) -> float:
    y = table["label"] if labels is None else labels
    return float(((table[views].mean(axis=1) > 0).astype(int).to_numpy() == y.to_numpy()).mean())


def score_run(run: RunDir, test_labels: pd.DataFrame) -> dict:
    held = pd.read_csv(run.tta_heldout)
    test = pd.read_csv(run.tta_test).drop(columns="label").merge(test_labels, left_on="id", right_on="ID")
    views = [f"v{k}" for k in range(8)]
    return {"val": accuracy(held, ["v0"]), "val_tta": accuracy(held, views),
            "test": accuracy(test, ["v0"]), "test_tta": accuracy(test, views)}


def fmt(values: list[float]) -> str:
    v = np.array(values)
    return f"{v.mean():.3f}" + (f" ({v.min():.3f}-{v.max():.3f})" if len(v) > 1 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcam", default=str(REPO.parent / "shared" / "data" / "pcam"))
    ap.add_argument("--work", default=str(REPO / "work" / "bench_accuracy"))
    ap.add_argument("--train-patches", type=int, default=4500)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--rows", choices=["key", "all"], default="key")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ensemble", action="store_true", help="also every fold of the default recipe + stacking")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every row, e.g. train.batch_size=64")
    a = ap.parse_args()
    pcam = Path(a.pcam)
    if not (pcam / "make_competition_h5.py").exists():
        raise SystemExit(f"{pcam} not found: this benchmark needs the shared PCam sample")
    root = Path(a.work)
    build_data(pcam, root, a.train_patches)
    run(root, "prepare")
    run(root, "folds")
    test_labels = pd.read_csv(root / "input" / "test_labels.csv")
    rows = ROWS | (MORE_ROWS if a.rows == "all" else {})
    results = []
    t0 = time.time()
    for name, overrides in rows.items():
        cfg_name = "abl_" + "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        scores = []
        for seed in a.seeds:
            ov = [f"name={cfg_name}", f"train.epochs={a.epochs}", f"train.seed={seed}", *overrides, *a.extra]
            folds = "all" if (a.ensemble and not overrides) else "1"
            run(root, "train", "--config", str(BASE), "--fold", folds, *ov)
            run(root, "infer")
            r = RunDir.of(root / "work" / "runs", cfg_name, seed, 1)
            s = score_run(r, test_labels)
            if a.rows == "all":
                run(root, "infer", "--adabn")
                s |= {f"{k}_adabn": v for k, v in score_run(r, test_labels).items()}
                run(root, "infer")
            scores.append(s)
        row = {"row": name, **{k: fmt([s[k] for s in scores]) for k in scores[0]}}
        results.append(row)
        print(row, f"[{time.time() - t0:.0f} s]", flush=True)
    table = pd.DataFrame(results)
    if a.ensemble:
        default = [r for r in find_runs(root / "work" / "runs") if r.model_name.startswith("abl_dann___dihedral___hed__default")]
        oof, test, names = build_features(default, root / "folds" / "folds.csv")
        test = test.merge(test_labels, left_on="id", right_on="ID")
        ens = {}
        for method in ("mean", "rank", "stack"):
            stacker = fit_stacker(oof, names) if method == "stack" else None
            _, pred = predict(method, test, names, stacker)
            ens[method] = float((pred == test["label"].to_numpy()).mean())
        print("ensemble of the default recipe over folds and seeds, test center 2:", ens)
        table = pd.concat([table, pd.DataFrame([{"row": f"ensemble ({m}) of {len(names)} x 4 fold models", "test_tta": f"{v:.3f}"}
                                                for m, v in ens.items()])], ignore_index=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    md = table.fillna("").to_string(index=False)
    (out / f"accuracy-{stamp}-{a.train_patches}p-{a.epochs}ep.txt").write_text(md + "\n")
    print("\nreal tissue (PCam), synthetic pseudo-center stain shift; single model = fold holding out center 1")
    print(md)


if __name__ == "__main__":
    main()
