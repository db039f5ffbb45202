"""Experiment trackers through Accelerate: train.log_with=tensorboard writes event files inside the run folder
that TensorBoard's own reader parses back into the logged values; the stack stage logs its comparison."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from histoshift.cli import main
from histoshift.config import TRACKERS, ConfigError, load_config
from histoshift.runs import RunDir

pytestmark = pytest.mark.slow  # trains a head


def _scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(p.parent for p in folder.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {folder}"
    out = {}
    for d in events:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_curves_of_a_run_and_of_the_stack(prepared_root, tmp_path, capsys):
    from helpers import FROZEN

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump({**FROZEN, "name": "tracked"}))
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(cfg), "--fold", "0", "train.log_with=tensorboard"]) == 0
    run = RunDir.of(root / "work" / "runs", "tracked", 0, 0)
    scalars = _scalars(run.path / "tracker")
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [s for s, _ in scalars["heldout_acc"]] == [r["epoch"] for r in records] == [1, 2]
    for key in ("heldout_acc", "train_loss", "heldout_brier"):
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6)
    summary = json.loads(run.summary.read_text())
    final = {int(row["center"]): row for row in summary["per_center"]}
    assert scalars["final/center0/accuracy"][0][1] == pytest.approx(final[0]["accuracy"], rel=1e-6)
    assert scalars["final/center3/ece"][0][1] == pytest.approx(final[3]["ece"], rel=1e-6)
    hparams = next((run.path / "tracker").rglob("hparams.yml"))
    assert yaml.safe_load(hparams.read_text())["model.backbone"] == "test_efficientnet"
    # the tracker is not part of the run: the finished run is kept when only it changes
    capsys.readouterr()
    assert main(r + ["train", "--config", str(cfg), "--fold", "0"]) == 0
    assert "is done with this config, skipping" in capsys.readouterr().out

    for fold in ("1", "3", "4"):
        assert main(r + ["train", "--config", str(cfg), "--fold", fold]) == 0
    assert main(r + ["infer"]) == 0
    assert main(r + ["stack", "--log-with", "tensorboard"]) == 0
    stack = _scalars(root / "work" / "stack" / "tracker")
    choice = json.loads((root / "work" / "stack" / "choice.json").read_text())
    for method, acc in choice["loco_accuracy"].items():
        assert stack[f"loco_accuracy/{method}"][0][1] == pytest.approx(acc, rel=1e-6)
    table = pd.read_csv(root / "work" / "stack" / "comparison.csv")
    row = table.iloc[0]
    assert stack[f"{row['method']}/center{int(row['center'])}/accuracy"][0][1] == pytest.approx(
        row["accuracy"], rel=1e-6
    )


def test_tracker_names_are_accelerates_and_unknown_ones_are_one_line(tmp_path, capsys):
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}
    assert load_config(overrides=["train.log_with=tensorboard,wandb"]).train.log_with == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'tb'"):
        load_config(overrides=["train.log_with=tb"])
    assert main(["--root", str(tmp_path), "stack", "--log-with", "tb"]) == 2
    assert "unknown tracker 'tb'" in capsys.readouterr().err
