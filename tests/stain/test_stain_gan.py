"""The stain-gan stage (MultiStain-CycleGAN) and aug.stain_norm: gan: what the generator learns on a tiny set,
resume, lineage (a changed cache or setting trains another generator; a generator trained again stales the runs
that used the old one), and the generator applied at training and inference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from histoshift import checkpoint
from histoshift.cli import main
from histoshift.config import AugCfg, load_config
from histoshift.data.augment import to_float
from histoshift.stages.stain_gan import train_stain_gan
from histoshift.stain import gan as stain_gan
from histoshift.stain.jitter import luma
from histoshift.stain.transform import InputTransform
from histoshift.tasks.colour import input_transform
from histoshift.data.cache import Cache
from histoshift.lineage import digest_file
from histoshift.paths import Paths
from histoshift.runs import RunDir

from helpers import tiny_config

pytestmark = pytest.mark.slow  # every test trains a (tiny) GAN

TINY_GAN = ["aug.stain_norm=gan", "stain_gan.channels=4", "stain_gan.blocks=1", "stain_gan.batch_size=4",
            "stain_gan.lr=2e-3"]
IMAGE_GAN = tiny_config(
    name="img_gan",
    aug={"stain_norm": "gan"},
    stain_gan={"channels": 4, "blocks": 1, "batch_size": 4, "lr": 2e-3, "steps": 4, "checkpoint_every": 2},
)


class _Crash(Exception):
    pass


def _root(prepared_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    return root


def _structure(gen: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean per-patch correlation of the output's grayscale with the input's."""
    with torch.no_grad():
        a, b = luma(gen(x)).flatten(1), luma(x).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean())


def test_the_generator_keeps_the_grayscale_structure_after_a_few_steps(prepared_root, tmp_path):
    root = _root(prepared_root, tmp_path)
    paths, cache = Paths(root), Cache.open(root / "work" / "cache")
    cfg = load_config(overrides=[*TINY_GAN, "stain_gan.steps=40"])
    folder = train_stain_gan(cfg, cache, paths)
    x = torch.from_numpy(np.array(cache.images("val")[:32])).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    before = _structure(stain_gan.Generator(4, 1).eval(), x)
    colour = stain_gan.load_colourizer(cfg, cache, paths)
    after = _structure(colour.generator, x)
    assert before < 0.3 and after > 0.7, (before, after)
    out = colour(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(luma(out).expand_as(out), out)  # colour, not a gray copy
    # the colour learned is the target center's: patches of another center (val = center 1) come out with mean
    # chromaticity (RGB over luma) nearer to center 2's than they went in, and nearer than the untrained net's
    index = cache.index
    target = torch.from_numpy(cache.gather(index[index["center"] == 2].head(32))).permute(0, 3, 1, 2).float() / 255

    def chroma(batch):
        return (batch.mean(dim=(0, 2, 3)) / luma(batch).mean()).numpy()

    def gap(batch):
        return float(np.abs(chroma(batch) - chroma(target)).sum())

    with torch.no_grad():
        untrained = stain_gan.Generator(4, 1).eval()(x)
    assert gap(out) < 0.6 * gap(x) and gap(out) < gap(untrained), (gap(x), gap(untrained), gap(out))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["spec"]["target"] == 2 and meta["spec"]["sources"] == [0, 1, 2, 3, 4] and meta["steps"] == 40
    assert (folder / "samples.png").stat().st_size > 0 and len(
        (folder / "losses.csv").read_text().splitlines()
    ) == 1 + 1
    assert not list(folder.glob("state-step*"))  # removed once the generator is written


def test_a_killed_gan_resumes_to_the_same_generator_and_a_finished_one_is_kept(prepared_root, tmp_path, monkeypatch,
                                                                              capsys):
    root = _root(prepared_root, tmp_path)
    paths, cache = Paths(root), Cache.open(root / "work" / "cache")
    cfg = load_config(overrides=[*TINY_GAN, "stain_gan.steps=6", "stain_gan.checkpoint_every=3"])
    real = checkpoint.save_state

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(_Crash):
        train_stain_gan(cfg, cache, paths)
    monkeypatch.setattr(checkpoint, "save_state", real)
    _, folder = stain_gan.gan_folder(cfg, cache, paths)
    assert checkpoint.last_state(folder, "state-step").name == "state-step3" and not (folder / "meta.json").exists()
    with pytest.raises(Exception, match="stain-gan --config"):  # unfinished: not usable
        stain_gan.load_colourizer(cfg, cache, paths)
    train_stain_gan(cfg, cache, paths)
    assert "resuming" in capsys.readouterr().out
    resumed = (folder / "generator.safetensors").read_bytes()

    other = tmp_path / "other"
    shutil.copytree(prepared_root, other)
    again = train_stain_gan(cfg, Cache.open(other / "work" / "cache"), Paths(other))
    assert (again / "generator.safetensors").read_bytes() == resumed  # bit-identical to an uninterrupted run
    train_stain_gan(cfg, cache, paths)
    assert "keeping it" in capsys.readouterr().out


def test_a_changed_cache_or_setting_trains_another_generator_and_stales_the_runs(prepared_root, tmp_path, capsys):
    """The run records the generator; training it again (--force) makes infer refuse the run; a changed cache
    or setting gives another folder (never the stale generator)."""
    root = _root(prepared_root, tmp_path)
    cfg_path = tmp_path / "img_gan.yaml"
    cfg_path.write_text(yaml.safe_dump(IMAGE_GAN))
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(cfg_path), "--fold", "0"]) == 2  # no generator yet: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "histoshift stain-gan --config" in err[0]
    assert main(r + ["stain-gan", "--config", str(cfg_path)]) == 0
    assert main(r + ["train", "--config", str(cfg_path), "--fold", "0"]) == 0
    run = RunDir.of(root / "work" / "runs", "img_gan", 0, 0)
    recorded = json.loads(run.inputs.read_text())["stain_gan"]
    folders = sorted(p for p in (root / "work" / "stain_gan").iterdir() if p.is_dir())
    assert len(folders) == 1 and recorded.startswith(folders[0].name)
    assert main(r + ["infer"]) == 0 and run.tta.path("test").exists()
    capsys.readouterr()

    # a different setting: another folder, the first one untouched
    assert main(r + ["stain-gan", "--config", str(cfg_path), "stain_gan.steps=3"]) == 0
    assert len([p for p in (root / "work" / "stain_gan").iterdir() if p.is_dir()]) == 2
    # the same setting trained again (--force keeps the old one aside); on this CPU it comes out bit-identical,
    # so the runs stay valid; a generator that differs (another machine, GPU non-determinism) stales them
    assert main(r + ["stain-gan", "--config", str(cfg_path), "--force"]) == 0
    assert list((root / "work" / "stain_gan").glob(f"{folders[0].name}.old-*"))
    assert main(r + ["infer", "--force"]) == 0
    weights = load_file(str(folders[0] / "generator.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(folders[0] / "generator.safetensors"))
    meta = json.loads((folders[0] / "meta.json").read_text())
    (folders[0] / "meta.json").write_text(
        json.dumps({**meta, "generator": digest_file(folders[0] / "generator.safetensors")})
    )
    capsys.readouterr()
    assert main(r + ["infer", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stain GAN's generator" in err[0] and "retrain" in err[0]

    # a changed cache (test.h5 rewritten): the stage trains into a new folder, keyed by the new cache id
    before = {p.name for p in (root / "work" / "stain_gan").iterdir() if p.is_dir()}
    from helpers import random_items, write_h5

    write_h5(root / "input" / "test.h5", random_items(np.random.default_rng(5), range(9000, 9030), 2, label=0))
    assert main(r + ["prepare"]) == 0
    assert main(r + ["stain-gan", "--config", str(cfg_path)]) == 0
    new = {p.name for p in (root / "work" / "stain_gan").iterdir() if p.is_dir()} - before
    cache = Cache.open(root / "work" / "cache")
    assert len(new) == 1 and json.loads((root / "work" / "stain_gan" / new.pop() / "meta.json").read_text())[
        "spec"]["cache"] == cache.id


def test_stain_norm_gan_applies_the_loaded_generator_at_training_and_inference(prepared_root, tmp_path):
    root = _root(prepared_root, tmp_path)
    paths, cache = Paths(root), Cache.open(root / "work" / "cache")
    cfg = load_config(overrides=[*TINY_GAN, "stain_gan.steps=2"])
    u8 = torch.from_numpy(np.array(cache.images("train")[:6]))
    with pytest.raises(Exception, match="stain-gan --config"):  # no generator trained yet: one line
        input_transform(cfg, cache, paths, "cpu")
    train_stain_gan(cfg, cache, paths)
    transform, lineage = input_transform(cfg, cache, paths, "cpu")
    assert set(lineage) == {"stain_gan"} and input_transform(load_config(), cache, paths, "cpu")[1] == {}
    colour = transform.colourizer
    plain = to_float(u8)
    torch.testing.assert_close(transform.infer(plain), colour(plain))
    no_jitter = cfg.aug.model_copy(update={"dihedral": False, "hed_sigma": 0.0, "brightness": 0.0, "contrast": 0.0})
    torch.testing.assert_close(InputTransform(no_jitter, colour).train(plain), colour(plain))
    unnormalised = InputTransform(AugCfg(**{**no_jitter.model_dump(), "stain_norm": "none"}))
    assert not torch.allclose(InputTransform(no_jitter, colour).train(plain), unnormalised.train(plain))
    # a head on features: the store key holds the generator, so another generator is another store
    from histoshift.features.store import feature_spec, store_key

    head = load_config(overrides=[*TINY_GAN, "stain_gan.steps=2", "model.kind=feature"])
    spec = feature_spec(head, cache, "no", lineage["stain_gan"])
    assert spec["stain_gan"] == lineage["stain_gan"] == stain_gan.identity(head, cache, paths)
    assert store_key(spec) != store_key(feature_spec(load_config(overrides=["model.kind=feature"]), cache, "no"))


def test_unknown_centers_and_the_per_center_variant(prepared_root, tmp_path):
    root = _root(prepared_root, tmp_path)
    paths, cache = Paths(root), Cache.open(root / "work" / "cache")
    with pytest.raises(Exception, match=r"center\(s\) \[7\] are not in the cache"):
        stain_gan.gan_spec(load_config(overrides=["stain_gan.target_center=7"]), cache)
    one = load_config(overrides=[*TINY_GAN, "stain_gan.steps=2", "stain_gan.sources=[0]", "stain_gan.target_center=1"])
    spec, folder = stain_gan.gan_folder(one, cache, paths)
    assert spec["sources"] == [0] and spec["target"] == 1 and folder.name.startswith("cyclegan-0-to1-")
    assert train_stain_gan(one, cache, paths) == folder and (folder / "generator.safetensors").exists()
