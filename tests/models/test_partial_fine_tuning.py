"""Partial fine-tuning (train only the last N block groups) and linear-probe-then-fine-tune."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from histoshift.config import ImageModelCfg, load_config
from histoshift.models.backbone import PatchClassifier, freeze_all_but_last
from histoshift.runs import RunDir
from histoshift.paths import Paths
from histoshift.stages.train import train_fold

from helpers import tiny_config


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit", "tf_efficientnet_lite0"])
def test_freeze_all_but_last_blocks(name):
    model = PatchClassifier(ImageModelCfg(backbone=name, weights="none", train_last_blocks=2), load_weights=False)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert not any(n.startswith(("conv_stem", "patch_embed", "cls_token", "blocks.0.")) for n in trainable)
    assert all(p.requires_grad for p in model.head.parameters())
    everything = PatchClassifier(ImageModelCfg(backbone=name, weights="none"), load_weights=False)
    assert all(p.requires_grad for p in everything.parameters())
    assert freeze_all_but_last(everything.backbone, 0) == len(list(everything.backbone.parameters()))


def _train(prepared_root, tmp_path, overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({
        **tiny_config(model={"drop_rate": 0.0}, train={"epochs": 2, "target_batch_size": 32, "steps_per_epoch": 2,
                                                       "eval_batch_size": 32})}))
    cfg = load_config(path, overrides)
    run = RunDir.of(tmp_path / "runs", cfg.name, 0, 1)
    train_fold(cfg, Paths(prepared_root), run)
    torch.manual_seed(1000)  # train_fold seeds seed + 1000 * fold before building the model
    start = PatchClassifier(cfg.model, load_weights=False).state_dict()
    return start, load_file(str(run.checkpoint)), cfg


@pytest.mark.slow
def test_partial_fine_tuning_leaves_early_blocks_untouched(prepared_root, tmp_path):
    start, end, _ = _train(prepared_root, tmp_path, ["model.train_last_blocks=1"])
    assert torch.equal(start["backbone.conv_stem.weight"], end["backbone.conv_stem.weight"])
    assert torch.equal(start["backbone.blocks.0.0.conv.weight"], end["backbone.blocks.0.0.conv.weight"])
    assert not torch.equal(start["backbone.conv_head.weight"], end["backbone.conv_head.weight"])
    assert not torch.equal(start["head.1.weight"], end["head.1.weight"])


@pytest.mark.slow
def test_linear_probe_then_fine_tune(prepared_root, tmp_path):
    start, end, _ = _train(prepared_root, tmp_path, ["train.probe_epochs=2"])  # probe for the whole run
    assert torch.equal(start["backbone.conv_stem.weight"], end["backbone.conv_stem.weight"])
    assert not torch.equal(start["head.1.weight"], end["head.1.weight"])
    start, end, _ = _train(prepared_root, tmp_path / "b", ["train.probe_epochs=1"])  # then fine-tune
    assert not torch.equal(start["backbone.conv_stem.weight"], end["backbone.conv_stem.weight"])
