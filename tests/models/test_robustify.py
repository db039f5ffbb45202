"""model.robustify and the `robustify` stage: InfoNCE against a hand computation; a CNN tuned in part, resumed after a
kill to the same weights, keying the feature store and the run's lineage, its file checked; LoRA on a foundation
stand-in merged back into the backbone's own layers; the refusals in one line."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import fm_config, one_error_line, tiny_config
from histoshift.algorithms.losses import info_nce
from histoshift.cli import main

ROBUST = {"steps": 4, "batch_size": 6, "checkpoint_every": 2}


def test_info_nce_is_the_hand_computation():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    source = torch.tensor([0, 1, 0, 1])  # views 0 and 2 of patch 0, views 1 and 3 of patch 1
    t = 0.5
    s = (z @ z.T).numpy() / t  # unit vectors: cosine similarity
    expected = np.mean([-math.log(math.exp(s[i, (i + 2) % 4]) / sum(math.exp(s[i, j]) for j in range(4) if j != i))
                        for i in range(4)])
    assert float(info_nce(z, source, t)) == pytest.approx(expected, rel=1e-5)


def test_info_nce_never_counts_views_of_the_same_patch_as_negatives():
    """Three views of each patch: every other view of the patch is a positive, none a negative."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([a, a, a, b, b, b])
    source = torch.tensor([0, 0, 0, 1, 1, 1])
    t = 1.0
    # anchor a: positives two views at similarity 1, negatives three at 0
    expected = -math.log(2 * math.e / (2 * math.e + 3))
    assert float(info_nce(z, source, t)) == pytest.approx(expected, rel=1e-5)
    assert float(info_nce(z, torch.tensor([0, 1, 2, 3, 4, 5]), t)) > float(info_nce(z, source, t))


def test_the_reinhard_pair_gives_the_second_view_another_centers_colours(prepared_root):
    """pair=reinhard: view 2 of a patch carries the CIELAB statistics of a patch of another center, view 1 its own
    (no jitter here: sigma 0; a dihedral view keeps the statistics)."""
    from histoshift.data.augment import to_float
    from histoshift.data.cache import Cache
    from histoshift.robustify_steps import stain_views as _views
    from histoshift.stain.classical import rgb_to_lab

    cache = Cache.open(prepared_root / "work" / "cache")
    rows = cache.index.reset_index(drop=True)
    every = rgb_to_lab(to_float(torch.from_numpy(cache.gather(rows))).double()).mean(dim=(2, 3))
    x, source = _views(cache, rows, 8, np.random.default_rng(3), 0.0, "cpu", "reinhard")
    assert x.shape[0] == 16 and source.tolist() == list(range(8)) * 2
    lab = rgb_to_lab(x.double()).mean(dim=(2, 3))
    nearest = torch.cdist(lab, every).argmin(1).numpy()
    centers = rows["center"].to_numpy()[nearest]
    assert (centers[8:] != centers[:8]).all()  # each second view looks like a patch of another center
    assert torch.cdist(lab[:8], every).min(1).values.max() < 1e-3  # the first view is the patch itself
    plain, _ = _views(cache, rows, 8, np.random.default_rng(3), 0.0, "cpu", "hed")  # both views: the patch itself
    lab = rgb_to_lab(plain.double()).mean(dim=(2, 3))
    assert torch.equal(torch.cdist(lab[8:], every).argmin(1), torch.cdist(lab[:8], every).argmin(1))


def _root(prepared_root, path):
    shutil.copytree(prepared_root, path)
    return ["--root", str(path)]


@pytest.mark.slow
def test_a_cnn_robustified_resumes_keys_the_store_and_is_checked(prepared_root, tmp_path, monkeypatch, capsys):
    from histoshift import checkpoint

    config = tiny_config("feature", name="rb", model={"robustify": ROBUST})
    (tmp_path / "rb.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(tiny_config("feature", name="plain")))
    whole, cut = _root(prepared_root, tmp_path / "whole"), _root(prepared_root, tmp_path / "cut")
    assert main(whole + ["robustify", "--config", str(tmp_path / "rb.yaml")]) == 0
    (folder,) = [p for p in (tmp_path / "whole" / "work" / "robust").iterdir() if p.is_dir()]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "partial" and meta["steps"] == 4 and not list(folder.glob("state-step*"))

    real = checkpoint.save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # killed right after the step-2 state
    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(cut + ["robustify", "--config", str(tmp_path / "rb.yaml")])
    monkeypatch.setattr(checkpoint, "save_state", real)
    assert main(cut + ["robustify", "--config", str(tmp_path / "rb.yaml")]) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = (load_file(str(r / "work" / "robust" / folder.name / "tuned.safetensors"))
            for r in (tmp_path / "whole", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the tuned backbone is another identity: its own store, other features, named in the run's lineage
    for name in ("rb", "plain"):
        assert main(whole + ["train", "--config", str(tmp_path / f"{name}.yaml"), "--fold", "0"]) == 0
    stores = {p.name: p for p in (tmp_path / "whole" / "work" / "features").iterdir()}
    (robust,) = [p for n, p in stores.items() if "-robust-" in n]
    (plain,) = [p for n, p in stores.items() if "-robust-" not in n]
    spec = json.loads((robust / "meta.json").read_text())["spec"]["backbone"]["robustify"]
    assert spec == {"key": folder.name, "tuned": meta["tuned"], "method": "partial"}
    assert not np.allclose(np.load(robust / "features_val.npy"), np.load(plain / "features_val.npy"))
    inputs = json.loads((tmp_path / "whole" / "work/runs/rb/seed0/fold0/inputs.json").read_text())
    assert inputs["features"] == robust.name
    capsys.readouterr()  # preflight finds both: the tuned backbone and the store embedded from it
    assert main(whole + ["preflight", "--config", str(tmp_path / "rb.yaml")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| rb |"))
    assert "| stored already |" in row and "| tuned already |" in row

    # a tuned file replaced since is refused when a store is embedded from it
    shutil.rmtree(robust)
    tuned = load_file(str(folder / "tuned.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tuned.items()}, str(folder / "tuned.safetensors"))
    capsys.readouterr()
    assert main(whole + ["embed", "--config", str(tmp_path / "rb.yaml")]) == 2
    line = one_error_line(capsys)
    assert "tuned.safetensors" in line and "does not match the digest" in line


@pytest.mark.slow
def test_a_fine_tuned_cnn_starts_from_the_robust_backbone_and_keeps_its_keys(prepared_root, tmp_path, capsys):
    config = tiny_config(name="rbimg", model={"robustify": ROBUST})
    (tmp_path / "rbimg.yaml").write_text(yaml.safe_dump(config))
    r = _root(prepared_root, tmp_path / "root")
    assert main(r + ["train", "--config", str(tmp_path / "rbimg.yaml"), "--fold", "0"]) == 2  # robustify first
    capsys.readouterr()  # preflight projects the stage's time: steps x batch x 2 views, forward and backward
    assert main(r + ["preflight", "--config", str(tmp_path / "rbimg.yaml")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| rbimg |"))
    assert "(4 steps x 6 x 2 views)" in row.split("|")[-3]
    assert main(r + ["robustify", "--config", str(tmp_path / "rbimg.yaml")]) == 0
    assert main(r + ["train", "--config", str(tmp_path / "rbimg.yaml"), "--fold", "0"]) == 0
    run = tmp_path / "root" / "work/runs/rbimg/seed0/fold0"
    assert json.loads((run / "inputs.json").read_text())["robustify"]["method"] == "partial"
    assert main(r + ["infer"]) == 0  # the checkpoint loads into a plain backbone: no adapter keys


@pytest.mark.slow
def test_lora_on_a_foundation_standin_is_merged_into_its_own_layers(prepared_root, hf_cache, tmp_path, capsys):
    from histoshift.config import load_config
    from histoshift.models.backbone import PatchClassifier
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin
    from histoshift.models.robust import apply_robust

    write_standin(RECIPES["dinov2_s"], hf_cache)
    path = fm_config(tmp_path / "fm.yaml", "dinov2_s", robustify={"steps": 2, "batch_size": 4, "lora_rank": 2})
    r = _root(prepared_root, tmp_path / "root")
    assert main(r + ["robustify", "--config", str(path)]) == 0
    (folder,) = [p for p in (tmp_path / "root" / "work" / "robust").iterdir() if p.is_dir()]
    tuned = load_file(str(folder / "tuned.safetensors"))
    assert tuned and all("lora_" in k for k in tuned) and any(k.endswith("qkv.lora_B.weight") for k in tuned)
    cfg = load_config(path)
    base = PatchClassifier(cfg.model).backbone
    keys = set(base.state_dict())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = apply_robust(base, cfg.model, folder)
    assert set(merged.state_dict()) == keys  # the backbone's own layers again
    changed = [k for k in keys if not torch.equal(merged.state_dict()[k], before[k])]
    assert changed and all(k.endswith("qkv.weight") for k in changed)
    # merged = base + (alpha / r) B A, layer by layer, from the saved adapters (peft's merge_and_unload)
    scale = cfg.model.robustify.lora_alpha / cfg.model.robustify.lora_rank
    for key in changed:
        prefix = key.removesuffix(".weight")
        (a,) = [v for k, v in tuned.items() if k.endswith(prefix.split("timm_model.")[-1] + ".lora_A.weight")]
        (b,) = [v for k, v in tuned.items() if k.endswith(prefix.split("timm_model.")[-1] + ".lora_B.weight")]
        torch.testing.assert_close(merged.state_dict()[key] - before[key], scale * b.float() @ a.float(),
                                   atol=1e-5, rtol=1e-4)

    bad = fm_config(tmp_path / "bad.yaml", "dinov2_s", robustify={"steps": 2, "lora_targets": ["nope"]})
    capsys.readouterr()
    assert main(r + ["robustify", "--config", str(bad)]) == 2
    line = one_error_line(capsys)
    assert "no linear layers named ['nope']" in line and "lora_targets" in line


def test_robustify_help_says_what_it_does_reads_and_writes():
    from histoshift.stages.robustify import STAGE

    what, blank, reads, writes = STAGE.description().splitlines()  # what it does, a blank line, reads, writes
    assert "stain views" in what and "embed alike" in what and not blank
    assert reads.startswith("reads:") and "model.robustify" in reads and "work/cache/" in reads
    assert writes.startswith("writes:") and all(f in writes for f in ("work/robust/<key>/", "tuned.safetensors",
                                                                     "meta.json", "losses.csv"))
