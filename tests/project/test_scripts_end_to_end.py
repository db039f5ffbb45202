"""`bash train.sh` then `bash infer.sh` on the offline demo, in a copy of the repository (minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from histoshift.data.h5_reader import list_ids
from histoshift.stack.folder import StackDir
from histoshift.stack.rules import DEFAULT
from histoshift.stages.submit import check_submission

from helpers import clone as make_clone
from helpers import small_demo


@pytest.mark.slow
def test_a_fresh_clone_with_broken_downloads_stops_at_preflight_in_one_line(tmp_path):
    """The three input files are random bytes (a broken download): `bash train.sh` stops at its first stage with
    one line naming input/train.h5, exit 2, and writes nothing."""
    clone = make_clone(tmp_path)
    (clone / "input").mkdir()
    for name in ("train.h5", "val.h5", "test.h5"):
        (clone / "input" / name).write_bytes(os.urandom(4096))
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(["bash", "train.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "input/train.h5" in errors[0], proc.stderr
    assert (
        "Traceback" not in proc.stderr
        and not (clone / "work").exists()
        and not (clone / "folds" / "folds.csv").exists()
    )


@pytest.mark.slow
def test_train_then_infer_on_the_demo(tmp_path):
    clone = make_clone(tmp_path)
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    # the suite's largest cost: 30% of the scripts' demo data and one of its two configs (the Lite1 config's
    # albumentations backend runs in tests/stages/test_stage_outputs.py; several members go through the scripts in
    # the foundation-set test below)
    small_demo(clone, env, per_center=48, test_size=48)
    env["CONFIGS"] = "configs/demo_lite0_dann.yaml"
    for script in ("train.sh", "infer.sh"):
        proc = subprocess.run(
            ["bash", script], cwd=clone, env=env, capture_output=True, text=True, timeout=5400
        )  # a bound for a hung script, not a speed test
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script} failed:\n{log[-4000:]}"
        assert "DEMO MODE" in log
    demo = clone / "demo"
    sub = pd.read_csv(demo / "submissions" / "submission.csv")
    check_submission(sub, list_ids(demo / "input" / "test.h5"))
    choice = json.loads((demo / "work" / "stack" / "choice.json").read_text())
    assert choice["members"] == ["demo_lite0_dann/seed0"]
    shipped = StackDir(demo / "work" / "stack").require_choice("stack").method  # the typed record, as text
    held_out = choice["loco_accuracy"][shipped]  # mean over the four held-out centers
    assert held_out > 0.8, f"held-out-center accuracy {held_out:.3f} does not beat chance clearly"
    labels = pd.read_csv(demo / "input" / "test_labels.csv").merge(sub, on="ID")
    assert (labels.Pred == labels.label).mean() > 0.8
    report = (demo / "work" / "report" / "report.md").read_text()
    for picture in ("../cache/overview.png", "../cache/colours.png", "curves.png", "feature_map.png", "combiners.png"):
        assert f"]({picture})" in report and (demo / "work" / "report" / picture).stat().st_size > 1000, picture
    assert f"by the rule '{choice['rule']}'" in report and choice["rule"] == DEFAULT
    # the scripts reach every candidate: FOURIER=1 predicts the Fourier sets (one beta here) and the stack weighs
    # them; RULE picks the rule
    proc = subprocess.run(["bash", "infer.sh"], cwd=clone, env={**env, "FOURIER": "1", "FOURIER_BETAS": "0.03",
                                                                  "RULE": "loco"},
                          capture_output=True, text=True, timeout=5400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    methods = set(pd.read_csv(demo / "work" / "stack" / "comparison.csv")["method"])
    assert {f"mean+fourier-b0.03-n{n}" for n in (1, 3, 7)} <= methods
    choice = json.loads((demo / "work" / "stack" / "choice.json").read_text())
    assert choice["rule"] == "loco" and choice["fourier_vs_pick"]["fourier"].split("+")[1].startswith("fourier-b0.03")
