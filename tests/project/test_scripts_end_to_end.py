"""`bash train.sh` then `bash infer.sh` on the offline demo, in a copy of the repository (minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histoshift.data.h5_reader import list_ids
from histoshift.stack.rules import DEFAULT
from histoshift.stages.submit import check_submission

from helpers import clone as make_clone


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


def _small_demo(clone: Path, env: dict, per_center: int = 32, test_size: int = 32) -> None:
    """A smaller demo dataset than the scripts' own (160 a labelled center, 240 test patches), written before
    train.sh (which keeps it): the scripts' logic needs no more, and two CPU cores pay for every patch (the
    foundation set's 480 px MedImageInsight stand-in embeds 12 views of each at 45 images/s)."""
    subprocess.run([sys.executable, "-m", "histoshift", "--root", "demo", "demo-data", "--per-center", str(per_center),
                    "--test-size", str(test_size)], cwd=clone, env=env, check=True, capture_output=True, timeout=1800)


@pytest.mark.slow
def test_train_then_infer_on_the_demo(tmp_path):
    clone = make_clone(tmp_path)
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    # the suite's largest cost: 30% of the scripts' demo data and one of its two configs (the Lite1 config's
    # albumentations backend runs in tests/stages/test_stage_outputs.py; several members go through the scripts in
    # the foundation-set test below)
    _small_demo(clone, env, per_center=48, test_size=48)
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
    held_out = choice["loco_accuracy"][choice["method"]]  # mean over the four held-out centers
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


@pytest.mark.slow
def test_foundation_model_set_offline_from_a_hub_cache(tmp_path):
    """`CONFIG_SET=foundation bash train.sh && bash infer.sh` with HF_HUB_OFFLINE=1 and a Hugging Face
    cache that holds stand-ins (random weights) of the set's models: preflight passes, every model embeds
    through the ordinary hub path, its heads join the stack stage as ensemble members, a submission is
    written - with the published MedImageInsight recipe (configs/paper_medimageinsight_mlp.yaml) in the set."""
    clone = make_clone(tmp_path)
    cache = tmp_path / "hf-cache"
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "TQDM_DISABLE": "1", "PYTHONPATH": str(clone / "src"), "CONFIG_SET": "foundation",
           "ALLOW_DEGENERATE": "1"}  # random stand-in features: a one-class submission is possible
    members = [line.split("/")[-1].removesuffix(".yaml") for line in
               (clone / "configs" / "sets" / "foundation.txt").read_text().splitlines() if line and line[0] != "#"]
    recipes = ",".join(
        yaml.safe_load((clone / "configs" / f"{m}.yaml").read_text())["model"]["recipe"] for m in members
    )
    for name in members + ["paper_medimageinsight_mlp"]:  # heads in batches of 32 (the shipped 256 needs 86 patches
        # a center, 3.6x the embedding on two cores); nothing else in the clone's configs changes
        path = clone / "configs" / f"{name}.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["train"].update(batch_size=32, target_batch_size=16)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "histoshift", "fm-standin", "--recipe", recipes, "--out", str(cache)],
                   env=env, check=True, capture_output=True, timeout=1800)
    _small_demo(clone, env, per_center=24, test_size=24)  # random stand-in features: nothing to learn

    def script(name: str) -> str:
        proc = subprocess.run(["bash", name], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=5400)  # a bound for a hung script, not a speed test
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
        return log

    # the published MedImageInsight recipe (frozen + MLP) in the same run, after the set's MedImageInsight config:
    # its preflight passes and it trains on that config's store (one embedding for both heads)
    sets = clone / "configs" / "sets" / "foundation.txt"
    sets.write_text(sets.read_text() + "configs/paper_medimageinsight_mlp.yaml\n")
    log = script("train.sh")
    assert f"preflight: {len(members) + 1} config(s) ready" in log
    assert log.count("| in the Hugging Face cache |") == len(members) + 1  # preflight's table
    assert log.count("embed: medimageinsight-") == 1  # embedded once, for both MedImageInsight configs
    demo = clone / "demo"
    stores = sorted(p.name for p in (demo / "work" / "features").iterdir())
    assert len(stores) == len(members) and all("-8v-hed4-" in s for s in stores)
    # The stand-in is in lion-ai/MedImageInsights' own layout: 2024.09.27/config.yaml, the .pt weights file with
    # image_encoder.* keys
    (snapshot,) = (cache / "models--lion-ai--MedImageInsights" / "snapshots").iterdir()
    assert (snapshot / "2024.09.27" / "vision_model" / "medimageinsigt-v1.0.0.pt").is_file()
    (store,) = [demo / "work" / "features" / s for s in stores if s.startswith("medimageinsight-")]
    meta = json.loads((store / "meta.json").read_text())
    assert (
        meta["dim"] == 16 and meta["spec"]["backbone"]["weights"]["revision"] == snapshot.name
    )  # the stand-in's projection
    log = script("infer.sh")
    assert log.count("STAND-IN") == 0  # infer.sh never loads a backbone: the heads' TTA predictions exist
    sub = pd.read_csv(demo / "submissions" / "submission.csv")
    check_submission(sub, list_ids(demo / "input" / "test.h5"))
    choice = json.loads((demo / "work" / "stack" / "choice.json").read_text())
    assert sorted({m.split("/")[0] for m in choice["members"]}) == sorted(members + ["paper_medimageinsight_mlp"])

