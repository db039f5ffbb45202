"""Speed options on CPU: precision per family, placement, tensor batches, channels_last, torch.compile."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml

from histoshift.config import load_config
from histoshift.data.loader import TensorBatches, place_images
from histoshift.precision import resolve_precision
from histoshift.runs import RunDir
from histoshift.paths import Paths
from histoshift.stages.train import train_fold

from helpers import tiny_config


def test_precision_defaults_per_family(monkeypatch):
    assert resolve_precision("bf16", "resnet50") == "bf16"
    assert resolve_precision("no", "vit_base_patch16_224") == "no"
    assert resolve_precision("auto", "tf_efficientnet_lite0") == "no"  # fp32 for depthwise-conv families
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "resnet50") == "no"  # CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "resnet50") == "bf16"
    assert resolve_precision("auto", "mobilenetv2_100") == "no"


def test_tensor_batches_shard_every_pass_without_overlap():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 2, 2, 3).contiguous()
    table = pd.DataFrame({"id": range(40), "center": [0] * 40, "label": [0.0, 1.0] * 20})
    ranks = [TensorBatches(images, table, {0: 0}, 6, torch.device("cpu"), seed=3, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == 3  # 40 // (6 * 2)
    for _ in range(2):  # two passes: a new permutation each time, the same across ranks
        seen = [torch.cat([b["image"][:, 0, 0, 0] for b in r]) for r in ranks]
        assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 36
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert place_images(images.numpy(), torch.device("cpu")).device.type == "cpu"


def test_one_view_batches_draw_a_view_of_each_row_with_the_order_and_repeat_per_epoch():
    """The feature task's streams: item = one of the row's V views, drawn from the stream's generator, so an
    epoch's batches (rows and views) are a function of (seed, epoch) and a resumed run sees the same."""
    feats = torch.arange(30 * 4, dtype=torch.float32).view(30, 4, 1)  # value = 4 * row + view
    table = pd.DataFrame({"id": range(30), "center": [0] * 30, "label": [0.0, 1.0] * 15})

    def epoch(e):
        stream = TensorBatches(feats, table, {0: 0}, 8, torch.device("cpu"), seed=5, one_view=True)
        stream.set_epoch(e)
        return torch.cat([b["image"][:, 0] for b in stream]).long()
    first = epoch(1)
    assert len(first) == 24 and len(set((first // 4).tolist())) == 24  # 3 batches of distinct rows
    assert set((first % 4).tolist()) == {0, 1, 2, 3}  # every view drawn somewhere
    assert torch.equal(first, epoch(1)) and not torch.equal(first, epoch(2))


@pytest.mark.parametrize("overrides", [["train.channels_last=true"], ["train.compile=true"],
                                       ["train.placement=host", "train.precision=bf16"]],
                         ids=["channels_last", "compile", "host-bf16"])
@pytest.mark.slow
def test_speed_options_train_and_predict(prepared_root, tmp_path, overrides):
    path = tmp_path / "opt.yaml"
    path.write_text(yaml.safe_dump({
        **tiny_config(algorithm={"name": "dann"}, aug={"backend": "torch"},
                      train={"steps_per_epoch": 2, "eval_batch_size": 32})}))
    cfg = load_config(path, overrides)
    run = RunDir.of(tmp_path / "runs", cfg.name, 0, 1)
    summary = train_fold(cfg, Paths(prepared_root), run)
    oof = pd.read_csv(run.oof)
    assert len(oof) == 24 and oof.logit.notna().all()
    assert summary["heldout_accuracy"] == pytest.approx(((oof.logit > 0).astype(int) == oof.label).mean())
    shutil.rmtree(tmp_path / "runs")
