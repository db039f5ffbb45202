"""The whole pipeline on a few hundred real H&E patches (PatchCamelyon, CC0) with synthetic
pseudo-center stain shifts, built by ../shared/data/pcam/make_competition_h5.py. Skipped when that
folder is absent (a user's clone has none). Real tissue, synthetic center shift."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from helpers import PCAM
from histoshift.cli import main

PER_CENTER = 80


@pytest.mark.skipif(not (PCAM / "make_competition_h5.py").exists(),
                    reason=f"real-tissue check skipped: {PCAM} is absent (it is not part of the product)")
@pytest.mark.slow
def test_pipeline_on_real_tissue_beats_chance_clearly(tmp_path):
    """Two epochs (64 s on 2 cores): held-out centers 0.81, test center 2 0.79 when measured; four epochs took 114 s
    for 0.86 / 0.81. The bounds below are far under both."""
    root = tmp_path / "root"
    subprocess.run([sys.executable, str(PCAM / "make_competition_h5.py"), str(root / "input"),
                    "--limit", str(PER_CENTER)], check=True, capture_output=True)
    cfg = tmp_path / "pcam_lite0.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet_lite0", "input_size": 96},
        "algorithm": {"name": "dann", "domain_weight": 0.1},
        "optim": {"lr": 1e-3, "backbone_lr": 1e-3},
        "aug": {"backend": "torch", "dihedral": True, "hed_sigma": 0.05},
        "train": {"epochs": 2, "batch_size": 32, "target_batch_size": 16, "eval_batch_size": 64}}))
    r = ["--root", str(root)]
    for stage in (["prepare"], ["folds"], ["train", "--config", str(cfg)], ["infer"], ["stack"], ["submit"]):
        assert main(r + stage) == 0, stage
    from histoshift.stack.folder import StackDir

    choice = StackDir(root / "work" / "stack").require_choice("stack")  # the typed record
    held_out = choice.loco_accuracy[choice.method]
    sub = pd.read_csv(root / "submissions" / "submission.csv")
    labels = pd.read_csv(root / "input" / "test_labels.csv").merge(sub, on="ID")
    test_acc = float((labels.Pred == labels.label).mean())
    print(
        f"real tissue ({PER_CENTER} patches per center): held-out-center accuracy {held_out:.3f}, test center 2 "
        f"{test_acc:.3f}"
    )
    assert held_out > 0.68 and test_acc > 0.65, (held_out, test_acc)
