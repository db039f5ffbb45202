"""`bash train.sh` then `bash infer.sh` on the offline demo, in a copy of the repository (minutes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from histoshift.data.h5_reader import list_ids
from histoshift.submit import check_submission

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_then_infer_on_the_demo(tmp_path):
    clone = tmp_path / "repo"
    clone.mkdir()
    for name in ("train.sh", "infer.sh", "requirements.txt", "pyproject.toml"):
        shutil.copy(REPO / name, clone / name)
    for name in ("src", "configs", "scripts"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "30"}
    for script in ("train.sh", "infer.sh"):
        proc = subprocess.run(["bash", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script} failed:\n{log[-4000:]}"
        assert "DEMO MODE" in log
    demo = clone / "demo"
    sub = pd.read_csv(demo / "submissions" / "submission.csv")
    check_submission(sub, list_ids(demo / "input" / "test.h5"))
    choice = json.loads((demo / "work" / "stack" / "choice.json").read_text())
    assert len(choice["members"]) == 2
    held_out = choice["loco_accuracy"][choice["method"]]  # mean over the four held-out centers
    assert held_out > 0.8, f"held-out-center accuracy {held_out:.3f} does not beat chance clearly"
    labels = pd.read_csv(demo / "input" / "test_labels.csv").merge(sub, on="ID")
    assert (labels.Pred == labels.label).mean() > 0.8
    assert (demo / "work" / "report" / "report.md").exists()
