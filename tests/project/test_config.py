"""Typed configs: YAML + overrides, unknown keys and wrong types rejected."""
from __future__ import annotations

from pathlib import Path

import pytest

from histoshift.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_are_typed(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr=3e-4", "train.epochs=5", "aug.dihedral=false", "model.backbone=resnet50"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.aug.dihedral is False
    assert cfg.model.backbone == "resnet50"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.epochs=abc", "train.epochs: expected int"),
    ("train.epochs=2.5", "train.epochs: expected an integer"),
    ("aug.dihedral=maybe", "aug.dihedral: expected a boolean"),
    ("algorithm.name=magic", "unknown algorithm 'magic'"),
    ("train.precision=fp8", "train.precision"),
    ("aug.backend=opencv", "aug.backend"),
    ("optim=3", "optim: expected a mapping"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS[0], [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'model\.widht'"):
        load_config(bad)


def test_a_runs_identity_leaves_out_how_it_is_watched_and_unused_gan_settings():
    from histoshift.config import load_config

    plain = load_config().identity()
    assert load_config(overrides=["train.log_with=tensorboard", "stain_gan.steps=5"]).identity() == plain
    gan = load_config(overrides=["aug.stain_norm=gan"]).identity()
    assert gan != plain and load_config(overrides=["aug.stain_norm=gan", "stain_gan.steps=5"]).identity() != gan


@pytest.mark.parametrize("old, shipped", [("old_run_config_image.yaml", "demo_lite0_dann.yaml"),
                                          ("old_run_config_feature.yaml", "fm_phikon2_frozen.yaml")])
def test_run_folders_of_the_version_before_the_kinds_keep_their_identity(old, shipped, capsys):
    """A finished run's config.yaml written before model.kind (every field, `frozen`, the store's settings in the
    train section) loads as the same run: no --force, nothing retrained."""
    here = Path(__file__).parent / "data"
    before = load_config(here / old)
    assert "frozen: " in (here / old).read_text() and before.model.kind in ("image", "feature")
    assert before.identity() == load_config(CONFIGS[0].parent / shipped, [f"name={before.name}"]).identity()
    assert "is deprecated; write model.kind" in capsys.readouterr().err


def test_a_configs_method_names_the_backbone_the_algorithm_and_the_switches_that_are_on():
    from histoshift.config import load_config

    assert load_config(CONFIG_DIR / "lite0_dann.yaml").method() == "tf_efficientnet_lite0 fine-tuned, DANN"
    assert load_config(CONFIG_DIR / "dart_avagrad_lite0.yaml").method() == (
        "tf_efficientnet_lite0 fine-tuned, DANN, optimizer avagrad, early stopping patience 2")
    frozen = load_config(CONFIG_DIR / "fm_midnight_frozen.yaml", overrides=["algorithm.name=tabe",
                                                                              "model.robustify.steps=10"])
    assert frozen.method().startswith("midnight frozen (robustified, hed pairs), MLP 512 head, TABE")
    assert load_config(overrides=["algorithm.name=dann_aiva", "train.average=swad"]).method().endswith(
        "DANN + AIVA, averaging swad")
