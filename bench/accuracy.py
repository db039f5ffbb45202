"""Accuracy ablation on real tissue: PatchCamelyon patches with synthetic pseudo-center stain shifts.

    python bench/accuracy.py [--pcam ../shared/data/pcam] [--train-patches 4500] [--epochs N]
                             [--rows none|key|more|aglr|stain|average|robust|dart|frozen|all] [--only TEXT..] [--adapt]
                             [--ensemble] [--frozen-ensemble] [--mixed]
                             [--pseudo 0.9] [--oracle] [--hidden] [--seeds 0 1 2] [--tag NAME] [--work DIR]

Builds train/val/test.h5 with ../shared/data/pcam/make_competition_h5.py (real tissue and labels,
synthetic centers: say so when reporting), keeps a random `--train-patches` of the training
centers (stratified by center; the anchors' reduced setting is 4,500, all is 19,171), then runs this
repository's own stages (prepare, folds, train, infer, stack: the code paths of train.sh / infer.sh)
with the repository's configs. `--epochs` overrides every config's epochs (default: the configs' own).

Single-model rows (overrides of configs/lite0_dann.yaml) use the fold that holds out center 1, i.e.
a model trained on centers 0/3/4 only, as in ANCHORS.md: val = center 1, test = center 2. Each row
is reported with TTA off (view 0) / on (8-view mean) and, with --adapt, adapted (AdaBN; a head's feature shift).
(Result files before 2026-12-07 call the flag --adabn and the columns *_adabn; --adabn is still accepted.)
--ensemble runs the default pipeline per seed (configs/lite0_dann.yaml + configs/lite1_dann.yaml,
every leave-one-center-out fold, 8-view TTA, plain and AdaBN predictions) and reports mean logits /
rank average / LightGBM stacker on each, and the choice the stack stage makes by leave-one-center-out
accuracy, on the test center.
--mixed (with both ensembles) stacks every member of the two together: a mixed set of
fine-tuned and frozen members, chosen by the stack stage's own rule.
--pseudo T adds one round of pseudo-labelling (train.pseudo_threshold=T) on top of each seed's
first round. --oracle adds the default recipe trained in-domain on half of the test center's labels
and scored on the other half, next to the shipped fold-1 model on the same half (the headroom left;
a reference, never a submission). --rows aglr: the Stain-AgLr switches on ERM and DANN with their
baselines. --rows frozen: heads on frozen ImageNet features (EfficientNet-Lite0/1 from the offline
packages; Lite2's package is not installed here) - linear probe, MLP, MLP + DANN head, sparse probe,
each feature shift - and the fine-tuned default for reference: the frozen path's mechanics on real
tissue, not a prediction for pathology models. --hidden: the same rows scored on a hidden center (the
test patches re-stained with HIDDEN_CENTER, parameters fixed before any result was seen). Several seeds: mean and
range. Runs already in --work are reused, so phases can be run one after another (cheap ones first). Results go
to bench/results/ after every row.
"""
from __future__ import annotations

import argparse
import json
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
from accelerate import Accelerator  # noqa: E402

from histoshift.cli import main as cli  # noqa: E402
from histoshift.data.cache import Cache  # noqa: E402
from histoshift.stages.infer import infer_run  # noqa: E402
from histoshift.metrics import logit_accuracy  # noqa: E402
from histoshift.paths import Paths  # noqa: E402
from histoshift.runs import RunDir, find_runs  # noqa: E402
from histoshift.stack.choice import compare_prediction_sets, decide  # noqa: E402
from histoshift.stack.combine import fit_stacker, predict  # noqa: E402
from histoshift.stack.sets import ADAPTED, METHODS, PLAIN, Label, PredictionSet  # noqa: E402
from histoshift.stages.stack import run_stack  # noqa: E402
from histoshift.data.donors import FourierTTA  # noqa: E402
from histoshift.tta import view_columns  # noqa: E402

BASE = REPO / "configs" / "lite0_dann.yaml"
PIPELINE = [REPO / "configs" / "lite0_dann.yaml", REPO / "configs" / "lite1_dann.yaml"]  # train.sh's default
NO_AUG = ["aug.dihedral=false", "aug.hed_sigma=0", "aug.brightness=0", "aug.contrast=0"]
KEY_ROWS = {  # name -> overrides of the default recipe (empty: the default config itself, shared with --ensemble)
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
AGLR_ROWS = {  # Stain-AgLr switches (issue 11), on ERM + dihedral + HED and on the default DANN recipe
    "ERM + dihedral + HED": KEY_ROWS["ERM + dihedral + HED"],
    "ERM + dihedral + HED + consistency (10)": ["algorithm.name=erm", "algorithm.consistency_weight=10"],
    "ERM + dihedral + HED + regeneration (0.1)": ["algorithm.name=erm", "algorithm.regen_weight=0.1"],
    "DANN + dihedral + HED (default)": [],
    "DANN + consistency (10)": ["algorithm.consistency_weight=10"],
    "DANN + regeneration (0.1)": ["algorithm.regen_weight=0.1"],
    "DANN + consistency (10) + regeneration (0.1)": ["algorithm.consistency_weight=10", "algorithm.regen_weight=0.1"],
}
STAIN_ROWS = {  # issue 21: stain handling, optimizers and reweighting on the default recipe (fine-tuned Lite0 DANN)
    "DANN + dihedral + HED (default)": [],
    "DANN + Reinhard normalisation": ["aug.stain_norm=reinhard"],
    "DANN + Macenko normalisation": ["aug.stain_norm=macenko"],
    "DANN + grayscale input": ["aug.grayscale=true"],
    # MultiStain-CycleGAN towards center 2, CPU-sized (the defaults are 16 channels, 4 blocks, 2,000 steps)
    "DANN + MultiStain-GAN normalisation": ["aug.stain_norm=gan", "stain_gan.channels=8", "stain_gan.blocks=2",
                                           "stain_gan.steps=400", "stain_gan.batch_size=16"],
    "DANN, Nero instead of AdamW": ["optim.name=nero", "optim.lr=1.0e-2", "optim.backbone_lr=1.0e-3",
                                    "optim.domain_lr=1.0e-3"],
    "DANN + class reweighting": ["algorithm.class_reweight=true"],
    "DANN + inverse-frequency domain loss": ["algorithm.domain_reweight=true"],
}
AVERAGE_ROWS = {  # issue 32: weight averaging (train.average) and stronger HED jitter on the default recipe
    "DANN + dihedral + HED (default)": [],
    "DANN + EMA of the weights": ["train.average=ema"],
    "DANN + SWAD (window on the held-out loss)": ["train.average=swad"],
    "DANN + SWA (second half of the steps)": ["train.average=swa"],
    "DANN, HED sigma 0.1": ["aug.hed_sigma=0.1"],
    "DANN, HED sigma 0.2": ["aug.hed_sigma=0.2"],
}
# issue 33: the DART 2022 methods beside DANN on the default recipe (configs/dart_*_lite0.yaml's switches); --adapt
# adds each with the existing adaptation
_AVAGRAD = ["optim.name=avagrad", "optim.lr=0.5", "optim.backbone_lr=0.2", "optim.domain_lr=0.5"]
DART_ROWS = {
    "DANN (the default, reference)": [],
    "LNTL (bias head reversed + negative entropy)": ["algorithm.name=lntl"],
    "TABE (confusion loss, bias head alone)": ["algorithm.name=tabe"],
    "CLGR (confusion loss + reversal)": ["algorithm.name=clgr"],
    "AIVA on ERM": ["algorithm.name=aiva"],
    "DANN + AIVA": ["algorithm.name=dann_aiva"],
    "DANN, AvaGrad + early stopping (patience 1)": [*_AVAGRAD, "train.early_stop_patience=1"],
}
# heads on frozen ImageNet features (issue 19): the frozen-feature path's mechanics on real tissue - a proxy,
# NOT a prediction for pathology foundation models. Every Lite0 row shares one feature store (8 dihedral
# views + 4 HED views of labelled patches); with --adapt the adapted columns are the feature shift
# re-estimated on the target center (identical to the plain ones for rows without a shift).
_FROZEN = ["model.kind=feature", "model.feature_hed_views=4", "train.epochs=20", "optim.weight_decay=1.0e-4"]
_MLP_DANN = [*_FROZEN, "algorithm.name=dann", "model.head_hidden=512"]
_LITE1 = ["model.backbone=tf_efficientnet_lite1", "model.weights=package:efficientnet_lite1"]
_SELF_TRAIN = ["model.self_train_rounds=3", "model.self_train_threshold=0.9"]
FROZEN_ROWS = {
    "frozen Lite0 (ImageNet), linear probe": [*_FROZEN, "algorithm.name=erm", "model.head_hidden=0"],
    "frozen Lite0, MLP": [*_FROZEN, "algorithm.name=erm", "model.head_hidden=512"],
    "frozen Lite0, MLP + DANN head": _MLP_DANN,
    "frozen Lite0, sparse probe (L1 0.003)": [
        *_FROZEN,
        "algorithm.name=erm",
        "model.head_hidden=0",
        "model.head_l1=0.003",
    ],
    "frozen Lite0, linear probe, CORAL": [
        *_FROZEN,
        "algorithm.name=erm",
        "model.head_hidden=0",
        "model.feature_shift=coral",
    ],
    "frozen Lite0, MLP + DANN head, standardize": [*_MLP_DANN, "model.feature_shift=standardize"],
    "frozen Lite0, MLP + DANN head, CORAL": [*_MLP_DANN, "model.feature_shift=coral"],
    "frozen Lite1 (ImageNet), MLP + DANN head": [*_MLP_DANN, *_LITE1],
    "frozen Lite1, MLP + DANN head, standardize": [*_MLP_DANN, *_LITE1, "model.feature_shift=standardize"],
    "frozen Lite1, MLP + DANN head, CORAL": [*_MLP_DANN, *_LITE1, "model.feature_shift=coral"],
    "frozen Lite0, linear probe, self-training (3 rounds, 0.9)": [
        *_FROZEN,
        "algorithm.name=erm",
        "model.head_hidden=0",
        *_SELF_TRAIN,
    ],
    "frozen Lite0, MLP + DANN head, standardize + self-training (3 rounds, 0.9)": [
        *_MLP_DANN,
        "model.feature_shift=standardize",
        *_SELF_TRAIN,
    ],
    "frozen Lite1, MLP + DANN head, standardize + self-training (3 rounds, 0.9)": [
        *_MLP_DANN,
        *_LITE1,
        "model.feature_shift=standardize",
        *_SELF_TRAIN,
    ],
    "fine-tuned Lite0 DANN (the default, reference)": [],
}
# issue 32: the robustify stage on the frozen heads (ImageNet CNNs, the only pretrained backbones offline): the
# backbone tuned so that two stain views of a patch embed alike (partial fine-tuning of its last 2 block groups,
# 200 steps of 32 patches from every center), then embedded and the same head trained on it
_ROBUST = ["model.robustify.steps=200", "model.robustify.batch_size=32"]
ROBUST_ROWS = {
    "frozen Lite0, MLP + DANN head, standardize": [*_MLP_DANN, "model.feature_shift=standardize"],
    "frozen Lite0 robustified, MLP + DANN head, standardize": [*_MLP_DANN, "model.feature_shift=standardize", *_ROBUST],
    "frozen Lite0 robustified (Reinhard pair), MLP + DANN head, standardize": [
        *_MLP_DANN, "model.feature_shift=standardize", *_ROBUST, "model.robustify.pair=reinhard"],
    "frozen Lite1, MLP + DANN head, standardize": [*_MLP_DANN, *_LITE1, "model.feature_shift=standardize"],
    "frozen Lite1 robustified, MLP + DANN head, standardize": [*_MLP_DANN, *_LITE1, "model.feature_shift=standardize",
                                                               *_ROBUST],
}
# --frozen-ensemble: the pipeline's configs (Lite0 + Lite1) with frozen backbones and the default frozen
# head (configs/fm_*_frozen.yaml: MLP + DANN head, per-center standardisation), plus self-training, so that
# the stack stage chooses between plain and adapted predictions by its own leave-one-center-out evidence
FROZEN_ENSEMBLE = [*_MLP_DANN, "model.feature_shift=standardize", *_SELF_TRAIN]
ROW_SETS = {
    "none": {},
    "key": KEY_ROWS,
    "more": MORE_ROWS,
    "aglr": AGLR_ROWS,
    "frozen": FROZEN_ROWS,
    "stain": STAIN_ROWS,
    "average": AVERAGE_ROWS,
    "robust": ROBUST_ROWS,
    "dart": DART_ROWS,
    "all": KEY_ROWS | MORE_ROWS | AGLR_ROWS,
}
# The hidden center (issue 19): the test patches again, re-stained by the PCam script's own stain_shift with
# parameters fixed on 2026-12-01 before any result was seen, so that a method tuned on center 2's shift
# shows. (H, E, D scale), (shift), brightness gain - as make_competition_h5.CENTERS.
HIDDEN_CENTER = ((0.70, 1.40, 0.85), (-0.02, 0.05, -0.01), 1.06)


def build_hidden(pcam: Path, root: Path, hidden: Path) -> None:
    """A copy of `root`'s input whose test.h5 holds the same PCam patches (by their pcam_index) re-stained
    with HIDDEN_CENTER (center id 2 kept: the layout's test center). Labels and ids unchanged."""
    build_restained(pcam, root, hidden, HIDDEN_CENTER, "hidden center")


def build_restained(pcam: Path, root: Path, out: Path, stain: tuple, what: str) -> None:
    """A copy of `root`'s input whose test.h5 holds the same PCam patches (by their pcam_index) re-stained with
    `stain` (make_competition_h5.CENTERS' format; center id 2 kept: the layout's test center). Labels, ids kept."""
    if (out / "input" / "test.h5").exists():
        return
    script = make_script(pcam)
    script.CENTERS[99] = stain
    manifest = {int(r["pcam_index"]): r for r in pd.read_csv(pcam / "manifest.csv").to_dict("records")
                if r["split"] == "valid"}
    (out / "input").mkdir(parents=True)
    for name in ("train.h5", "val.h5", "test_labels.csv"):
        shutil.copy(root / "input" / name, out / "input" / name)
    with h5py.File(root / "input" / "test.h5") as src, h5py.File(out / "input" / "test.h5", "w") as dst:
        keys = list(src.keys())
        rows = [manifest[int(src[k]["metadata"][1])] for k in keys]
        images = script.stain_shift(script.load(rows), 99)
        for k, img in zip(keys, images):
            g = dst.create_group(k)
            g["img"] = img.transpose(2, 0, 1).astype(np.float32) / 255.0
            g["label"] = np.int64(src[k]["label"][()])
            g["metadata"] = np.array(src[k]["metadata"][()], dtype=np.int64)
    print(f"data: {what} - the {len(keys)} test patches re-stained with {stain}")


def make_script(pcam: Path):
    """The PCam sample's make_competition_h5.py as a module (its CENTERS, stain_shift, load)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_competition_h5", pcam / "make_competition_h5.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def build_oracle(root: Path, train_patches: int, seed: int = 0) -> tuple[Path, set[int], int]:
    """An in-domain copy of the test center (reference only, never a submission): its labelled patches
    split in two halves by a seeded permutation; half A (at most `train_patches`) becomes the training
    file (renamed center 0), half B the validation file (center 1) and, as the layout needs one, the
    test file (center 2). The default recipe's fold-1 model of this root is then trained on test-center
    labels and scored on half B, the same patches the shipped models are scored on. Returns the folder,
    half B's ids and the number of training patches."""
    oracle = root / "oracle"
    labels = pd.read_csv(root / "input" / "test_labels.csv").set_index("ID")["label"]
    ids = np.random.default_rng(seed).permutation(labels.index.to_numpy())
    half_a, half_b = ids[: len(ids) // 2][:train_patches], ids[len(ids) // 2:]
    inp = oracle / "input"
    if not (inp / "test.h5").exists():
        inp.mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "input" / "test.h5") as src:
            # the test file repeats half B under other ids (ids are unique across the three files)
            for name, part, center, offset in (
                ("train", half_a, 0, 0),
                ("val", half_b, 1, 0),
                ("test", half_b, 2, 10**9),
            ):
                with h5py.File(inp / f"{name}.h5", "w") as dst:
                    for i in part:
                        g = dst.create_group(str(i + offset))
                        g["img"] = src[str(i)]["img"][()]
                        g["label"] = np.int64(labels[i])
                        g["metadata"] = np.array([center, i], dtype=np.int64)
        test_labels = labels.loc[half_b].rename("label").reset_index()
        test_labels.assign(ID=test_labels["ID"] + 10**9).to_csv(inp / "test_labels.csv", index=False)
    return oracle, set(int(i) for i in half_b), len(half_a)


def build_data(pcam: Path, root: Path, train_patches: int, seed: int = 0) -> None:
    inp = root / "input"
    if (inp / "test.h5").exists():  # built already (or the same files rebuilt on another machine)
        return
    full = root / "full"
    if not (full / "test.h5").exists():
        subprocess.run([sys.executable, str(pcam / "make_competition_h5.py"), str(full)], check=True)
    inp.mkdir(parents=True)
    for name in ("val.h5", "test.h5", "test_labels.csv"):
        shutil.copy(full / name, inp / name)
    with h5py.File(full / "train.h5") as src:
        keys = np.array(list(src.keys()))
        if train_patches >= len(keys):
            shutil.copy(full / "train.h5", inp / "train.h5")
            print(f"data: all {len(keys)} train patches (centers 0/3/4), val/test from PCam valid "
                  "(real tissue, synthetic centers)")
            return
        rng = np.random.default_rng(seed)
        centers = np.array([int(src[k]["metadata"][0]) for k in keys])
        keep = []
        for c in np.unique(centers):  # stratified: the competition's center proportions stay
            ks = keys[centers == c]
            keep += list(rng.choice(ks, size=round(train_patches * len(ks) / len(keys)), replace=False))
        with h5py.File(inp / "train.h5", "w") as dst:
            for k in keep:
                src.copy(src[k], dst, name=k)
    print(f"data: {len(keep)} train patches (centers 0/3/4), val/test from PCam valid (real tissue, synthetic centers)")


class Bench:
    def __init__(self, root: Path, epochs: int | None, configs: list[Path], fourier: FourierTTA | None = None):
        self.root, self.epochs, self.configs, self.fourier = root, epochs, configs, fourier
        self.runs = root / "work" / "runs"
        self.labels = pd.read_csv(root / "input" / "test_labels.csv")
        self._cache = self._accelerator = None

    def stage(self, *args) -> None:
        if cli(["--root", str(self.root), *args]) != 0:
            raise SystemExit(f"stage failed: {args}")

    def train(self, config: Path, seed: int, fold: str, overrides: list[str]) -> None:
        ov = [f"train.seed={seed}", *([f"train.epochs={self.epochs}"] if self.epochs else []), *overrides]
        if any(o.startswith("model.robustify.") for o in overrides):  # a tuned backbone per seed too
            ov.append(f"model.robustify.seed={seed}")
        self.stage("stain-gan", "--config", str(config), *ov)  # aug.stain_norm=gan's generator (others: nothing)
        self.stage("robustify", "--config", str(config), *ov)  # model.robustify's tuned backbone (others: nothing)
        self.stage("train", "--config", str(config), "--fold", fold, *ov)

    def infer(self, run: RunDir, adapt: bool = False) -> None:
        """The infer stage for one run (the stage itself loops `infer_run` over every run); with `adapt`
        the adapted set too."""
        if self._cache is None:
            self._cache, self._accelerator = Cache.open(self.root / "work" / "cache"), Accelerator()
        infer_run(run, self._cache, Paths(self.root), self._accelerator, adapt=adapt, fourier=self.fourier)

    def test_table(self, run: RunDir, pset: PredictionSet = PLAIN) -> pd.DataFrame:
        """The test center's predictions of one set (plain, adapted, Fourier: run.tta.path) with labels."""
        test = pd.read_csv(run.tta.path("test", pset)).drop(columns="label")
        return test.merge(self.labels, left_on="id", right_on="ID")

    def score_run(self, run: RunDir, adapted: bool = False) -> dict:
        pset = ADAPTED if adapted else PLAIN
        held, test = pd.read_csv(run.tta.path("heldout", pset)), self.test_table(run, pset)
        views = [f"v{k}" for k in range(8)]
        out = {"val": accuracy(held, ["v0"]), "val_tta": accuracy(held, views),
               "test": accuracy(test, ["v0"]), "test_tta": accuracy(test, views)}
        if self.fourier is not None and not adapted:  # each beta's set: logits averaged over its donors
            for beta in self.fourier.betas:
                table = self.test_table(run, PredictionSet.fourier(beta))
                out[f"test_fourier_b{beta:g}"] = accuracy(table, view_columns(table))
        return out

    def pipeline(self, seed: int, suffix: str = "", overrides: tuple[str, ...] = ()) -> list[RunDir]:
        """train.sh + infer.sh for one seed: every default config on every fold, TTA predictions."""
        runs = []
        for config in self.configs:
            name = config.stem + suffix
            self.train(config, seed, "all", [f"name={name}", *overrides])
            for run in self.member(name, seed):
                self.infer(run, adapt=True)  # infer.sh runs `infer --adapt`: both sets
                runs.append(run)
        return runs

    def member(self, name: str, seed: int) -> list[RunDir]:
        return [r for r in find_runs(self.runs) if r.model_name == f"{name}/seed{seed}"]

    def ensemble_scores(self, runs: list[RunDir]) -> dict:
        """Test-center accuracy of each combiner on plain and AdaBN predictions, and of the one the
        stack stage picks by leave-one-center-out accuracy on the out-of-fold predictions."""
        features, comparison, hits = compare_prediction_sets(runs, self.root / "folds" / "folds.csv",
                                                             Cache.open(self.root / "work" / "cache"), prior=0.5)
        out = {}
        for pset, (oof, test, names) in features.items():
            test = test.merge(self.labels, left_on="id", right_on="ID")
            for method in METHODS:
                stacker = fit_stacker(oof, names) if method == "stack" else None
                _, pred = predict(method, test, names, stacker)
                out[str(Label(method, pset))] = float((pred == test["label"].to_numpy()).mean())
        out["fourier_sets"] = {s.name: str(Label("mean", s)) for s in features if s.kind == "fourier"}
        d = decide(features, comparison, hits, prior=0.5)  # the stack stage's own decision, as it ships
        picked, matched = d.label, d.prior_matching
        out["picked"] = out[str(picked)]
        out["picked_method"] = str(picked)
        # prior matching: the picked combiner thresholded so that half the test patches are positive
        oof, test, names = d.oof, d.test.merge(self.labels, left_on="id", right_on="ID"), d.names
        method = picked.combiner
        _, pred = predict(method, test, names, fit_stacker(oof, names) if method == "stack" else None, prior=0.5)
        out["picked_prior"] = float((pred == test["label"].to_numpy()).mean())
        out["prior_used"] = bool(matched["used"])
        shipped = d.test[["id"]].assign(pred=d.pred).merge(self.labels, left_on="id", right_on="ID")
        out["shipped"] = float((shipped["pred"] == shipped["label"]).mean())
        out["loco_prior"] = f"{matched['loco_with']:.4f} vs {matched['loco_without']:.4f}"
        out["fourier"] = d.fourier
        single = [self.score_run(r)["test_tta"] for r in runs]
        out["single_fold_models_tta"] = float(np.mean(single))
        return out


def accuracy(table: pd.DataFrame, views: list[str]) -> float:
    return logit_accuracy(table, views)  # the package's one definition


def fmt(values: list[float]) -> str:
    v = np.array(values)
    return f"{v.mean():.3f}" + (f" ({v.min():.3f}-{v.max():.3f}, n={len(v)})" if len(v) > 1 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcam", default=str(REPO.parent / "shared" / "data" / "pcam"))
    ap.add_argument("--work", default=str(REPO / "work" / "bench_accuracy"))
    ap.add_argument("--train-patches", type=int, default=4500)
    ap.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    ap.add_argument("--rows", choices=sorted(ROW_SETS), default="key")
    ap.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                    help="keep only the rows of --rows whose name contains one of these (case-insensitive)")
    ap.add_argument("--adapt", "--adabn", dest="adapt", action="store_true",
                    help="also score every single-model row adapted (AdaBN; a head's feature shift)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ensemble", action="store_true", help="the default pipeline per seed: 2 configs x 4 folds")
    ap.add_argument("--frozen-ensemble", action="store_true",
                    help="the same pipeline with frozen backbones and FROZEN_ENSEMBLE's heads (ImageNet features)")
    ap.add_argument("--mixed", action="store_true",
                    help="with --ensemble and --frozen-ensemble: also every member of both through one stack")
    ap.add_argument("--fourier", action="store_true",
                    help="also `infer --fourier` (betas 0.01 0.03 0.05, 7 donors): single rows get a column per beta, "
                         "the ensembles' stack weighs the Fourier sets (rows per set, mean combiner)")
    ap.add_argument("--pseudo", type=float, default=0.0, help="+ one round of pseudo-labels at this threshold")
    ap.add_argument("--oracle", action="store_true",
                    help="+ the default recipe trained on half of the test center's own labels, scored on the other "
                         "half next to the shipped model (the headroom; reference only)")
    ap.add_argument(
        "--configs", nargs="+", type=Path, default=PIPELINE, help="the pipeline's configs (train.sh's CONFIGS)"
    )
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. train.batch_size=64")
    ap.add_argument("--tag", default="", help="name of the results file (default: patches and epochs)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--hidden", action="store_true",
                    help="score the rows on the hidden center instead (the test patches re-stained with "
                         "HIDDEN_CENTER, fixed before any result): a second work folder, everything retrained")
    a = ap.parse_args()
    if a.mixed and not (a.ensemble and a.frozen_ensemble):
        ap.error("--mixed stacks the members of --ensemble and --frozen-ensemble together: give both")
    pcam = Path(a.pcam)
    if not (pcam / "make_competition_h5.py").exists():
        raise SystemExit(f"{pcam} not found: this benchmark needs the shared PCam sample")
    root = Path(a.work)
    build_data(pcam, root, a.train_patches)
    if a.hidden:
        build_hidden(pcam, root, root.with_name(root.name + "_hidden"))
        root = root.with_name(root.name + "_hidden")
    bench = Bench(root, a.epochs, a.configs, FourierTTA() if a.fourier else None)
    bench.stage("prepare")
    bench.stage("folds")
    tag = a.tag or f"{a.train_patches}p-{a.epochs or 'cfg'}ep" + ("-hidden" if a.hidden else "")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    results, t0 = [], time.time()

    def record(row: dict) -> None:
        results.append(row)
        print(row, f"[{time.time() - t0:.0f} s]", flush=True)
        table = pd.DataFrame(results)
        order = [c for c in ["row", "val", "val_tta", "val_tta_adapted", "test", "test_tta", "test_tta_adapted",
                             *sorted(c for c in table.columns if c.startswith("test_fourier")), "note"]
                 if c in table.columns]
        table = table[order].fillna("")
        text = (
            f"# {stamp}, {a.train_patches} train patches, epochs {a.epochs or 'from the configs'}, seeds {a.seeds}\n"
            "# real tissue (PCam), SYNTHETIC pseudo-center stain shift; single model = fold holding out center 1\n"
            + (
                "# test = the HIDDEN center (the test patches re-stained with parameters fixed before any result)\n"
                if a.hidden
                else ""
            )
            + (
                "# frozen rows: ImageNet features - a proxy for the frozen path's mechanics, not a prediction for "
                "pathology models; *_adapted = the feature shift re-estimated / self-training on the target\n"
                if a.rows in ("frozen", "robust") or a.frozen_ensemble
                else ""
            )
            + table.to_string(index=False)
            + "\n"
        )
        (out / f"accuracy-{stamp}-{tag}.txt").write_text(text)

    members: dict[int, list] = {}  # seed -> every pipeline's runs (--mixed stacks them together)
    for frozen in [False] * a.ensemble + [True] * a.frozen_ensemble + [None] * a.mixed:
        per_seed, pre = {}, {False: "", True: "frozen ", None: "mixed (fine-tuned + frozen) "}[frozen]
        overrides = tuple([*FROZEN_ENSEMBLE] * bool(frozen) + a.extra)
        for seed in a.seeds:
            if frozen is None:  # the mixed set: both pipelines' members through one stack
                per_seed[seed] = bench.ensemble_scores(members[seed])
                continue
            runs = bench.pipeline(seed, "_frozen" * frozen, overrides)
            members.setdefault(seed, []).extend(runs)
            per_seed[seed] = bench.ensemble_scores(runs)
            print(f"seed {seed}: {pre}pipeline on the test center: {json.dumps(per_seed[seed])}", flush=True)
        for key, label in [
            (
                "single_fold_models_tta",
                f"single fold models, TTA (mean over {4 * len(a.configs) * (2 if frozen is None else 1)} models)",
            ),
            *[(m, f"pipeline, {m} combiner") for m in METHODS],
            *[(str(Label(m, ADAPTED)), f"pipeline with AdaBN, {m} combiner") for m in METHODS],
            ("picked", "pipeline, combiner picked by LOCO"),
            ("picked_prior", "same, thresholded to the known 50% positive share (prior matching)"),
            ("shipped", "pipeline as shipped (prior matching only where LOCO says it helps)"),
        ]:
            note = {"picked": "picked: " + ",".join(s["picked_method"] for s in per_seed.values()),
                    "picked_prior": "LOCO with vs without: " + "; ".join(s["loco_prior"] for s in per_seed.values()),
                    "shipped": "prior used: " + ",".join(str(s["prior_used"]) for s in per_seed.values())}.get(key, "")
            record({"row": pre + label, "test_tta": fmt([s[key] for s in per_seed.values()]), "note": note})
        fourier_sets = per_seed[a.seeds[0]]["fourier_sets"]
        for name, key in fourier_sets.items():  # each Fourier set and number of donors (mean combiner), the verdict
            record({"row": f"{pre}pipeline, Fourier set {name}, mean combiner",
                    "test_tta": fmt([s[key] for s in per_seed.values()])})
        if fourier_sets:
            record(
                {
                    "row": f"{pre}stack's Fourier verdict (best Fourier set vs the pick, McNemar z LOCO)",
                    "test_tta": "",
                    "note": "; ".join(json.dumps(s["fourier"]) for s in per_seed.values()),
                }
            )
        if a.pseudo:
            # the second round's models alone, and both rounds together (the stack stage ensembles
            # every run in work/runs, so a second round run after the first gives the latter)
            pl, both = {}, {}
            for seed in a.seeds:
                first = [r for c in a.configs for r in bench.member(c.stem, seed)]
                run_stack(first, root / "folds" / "folds.csv", root / "work" / "stack",  # what pseudo_labels reads
                          root / "work" / "cache")
                second = bench.pipeline(seed, suffix="_pl", overrides=(f"train.pseudo_threshold={a.pseudo}", *a.extra))
                pl[seed], both[seed] = bench.ensemble_scores(second), bench.ensemble_scores(first + second)
            for scores, label in [(pl, "second-round models only"), (both, "both rounds' models (the stack stage)")]:
                for key in [*METHODS, *[str(Label(m, ADAPTED)) for m in METHODS]]:
                    record({"row": f"+ pseudo-labels ({a.pseudo}), {label}, {key}",
                            "test_tta": fmt([s[key] for s in scores.values()])})
                record({"row": f"+ pseudo-labels ({a.pseudo}), {label}, as picked by LOCO",
                        "test_tta": fmt([s["picked"] for s in scores.values()]),
                        "note": "picked: " + ",".join(s["picked_method"] for s in scores.values())})

    rows = {n: o for n, o in ROW_SETS[a.rows].items() if not a.only or any(t.lower() in n.lower() for t in a.only)}
    if a.only and not rows:
        raise SystemExit(f"--only {a.only}: no row of --rows {a.rows} matches ({', '.join(ROW_SETS[a.rows])})")
    for name, overrides in rows.items():
        scores = []
        for seed in a.seeds:
            cfg_name = BASE.stem if not overrides else "abl_" + "".join(
                ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
            bench.train(BASE, seed, "1", [f"name={cfg_name}", *overrides, *a.extra])
            run = RunDir.of(bench.runs, cfg_name, seed, 1)
            bench.infer(run, adapt=a.adapt)
            s = bench.score_run(run)
            if a.adapt:
                s |= {f"{k}_adapted": v for k, v in bench.score_run(run, adapted=True).items() if k.endswith("tta")}
            scores.append(s)
        record({"row": name, **{k: fmt([s[k] for s in scores]) for k in scores[0]}})
    if a.oracle:
        oracle_root, half_b, n_train = build_oracle(root, a.train_patches)
        oracle = Bench(oracle_root, a.epochs, a.configs)
        oracle.stage("prepare")
        oracle.stage("folds")
        scores = []
        for seed in a.seeds:
            oracle.train(BASE, seed, "1", [f"name={BASE.stem}", *a.extra])
            orun = RunDir.of(oracle.runs, BASE.stem, seed, 1)
            oracle.infer(orun)
            bench.train(BASE, seed, "1", [f"name={BASE.stem}", *a.extra])  # the shipped recipe (reused when done)
            run = RunDir.of(bench.runs, BASE.stem, seed, 1)
            bench.infer(run)
            shipped = bench.test_table(run)
            shipped = shipped[shipped["id"].isin(half_b)]
            views = [f"v{k}" for k in range(8)]
            held = oracle.score_run(orun)
            scores.append({"test": held["val"], "test_tta": held["val_tta"],
                           "shipped": accuracy(shipped, ["v0"]), "shipped_tta": accuracy(shipped, views)})
        record(
            {
                "row": f"ORACLE: default recipe trained on {n_train} labelled TEST-center patches "
                "(in-domain, reference only)",
                "test": fmt([s["test"] for s in scores]),
                "test_tta": fmt([s["test_tta"] for s in scores]),
                "note": f"on half B of the test center ({len(half_b)} patches); the shipped DANN fold-1 model on "
                f"the same patches: {fmt([s['shipped'] for s in scores])} / {fmt([s['shipped_tta'] for s in scores])}",
            }
        )
    print(f"\nwrote {out / f'accuracy-{stamp}-{tag}.txt'}")


if __name__ == "__main__":
    main()
