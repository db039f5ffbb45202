"""AIVA through the train stage: its clusters are recomputed before every epoch from the epoch's own batches, so a
run stopped after an epoch and resumed ends with the weights and metrics of an uninterrupted one."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import IMAGE, _merge
from histoshift.cli import main


def _train(root, path) -> int:
    return main(["--root", str(root), "train", "--config", str(path), "--fold", "0"])


def _metrics(root) -> list[dict]:
    lines = (root / "work/runs/aiva/seed0/fold0/metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.mark.slow
def test_dann_aiva_trains_logs_its_term_and_resumes_exactly(prepared_root, tmp_path, monkeypatch):
    from histoshift import checkpoint

    config = _merge(IMAGE, {"name": "aiva", "train": {"epochs": 2},
                            "algorithm": {"name": "dann_aiva", "aiva_clusters": 3, "aiva_dims": 4, "aiva_samples": 32}})
    path = tmp_path / "aiva.yaml"
    path.write_text(yaml.safe_dump(config))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for r in (whole, cut):
        shutil.copytree(prepared_root, r)
    assert _train(whole, path) == 0
    metrics = _metrics(whole)
    assert len(metrics) == 2 and all(m["train_aiva_loss"] > 0 and "train_dom_loss" in m for m in metrics)

    real = checkpoint.save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # stopped after the first epoch's state
    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(cut, path)
    monkeypatch.setattr(checkpoint, "save_state", real)
    assert _train(cut, path) == 0
    assert _metrics(cut) == metrics
    a, b = (load_file(str(r / "work/runs/aiva/seed0/fold0/model.safetensors")) for r in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("aiva_") for k in a)  # the clusters are the algorithm's, not the model's
