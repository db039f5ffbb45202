"""The kinds of model behind one protocol (tasks/): the same methods, the config's model.kind choosing the class,
each kind's config holding only its own fields."""
from __future__ import annotations

import inspect

import pytest

from histoshift.config import ConfigError, load_config
from histoshift.tasks import TASKS, FeatureTask, ImageTask, Task, load_experiment

# the Protocol's own methods, read from it: a method added to Task is checked here without editing this list
PROTOCOL = tuple(name for name, value in vars(Task).items() if callable(value) and not name.startswith("_"))


def test_both_kinds_implement_the_whole_protocol_with_the_same_signatures():
    assert {"fourier_predictor", "features", "predictor", "adapt"} <= set(PROTOCOL)  # the list is read, not empty
    assert set(TASKS) == {"image", "feature"} and TASKS["image"] is ImageTask and TASKS["feature"] is FeatureTask
    for name in PROTOCOL:
        image, feature = getattr(ImageTask, name), getattr(FeatureTask, name)
        assert list(inspect.signature(image).parameters) == list(inspect.signature(feature).parameters), name
    assert list(inspect.signature(ImageTask).parameters) == list(inspect.signature(FeatureTask).parameters)
    for cls in (ImageTask, FeatureTask):
        assert all(callable(getattr(cls, name)) for name in PROTOCOL) and set(PROTOCOL) <= set(dir(Task))


def test_the_config_chooses_the_kind(capsys):
    assert load_config(None).model.kind == "image"
    assert load_config(None, ["model.kind=feature"]).model.kind == "feature"
    legacy = load_config(None, ["model.frozen=true"])  # configs written before the kinds still load
    assert legacy.model.kind == "feature" and "frozen" not in legacy.model.model_dump()
    assert "model.frozen: true is deprecated; write model.kind: feature" in capsys.readouterr().err
    assert load_config(None, ["model.frozen=false"]).model.kind == "image"
    with pytest.raises(ConfigError, match="contradicts model.kind"):
        load_config(None, ["model.kind=image", "model.frozen=true"])


def test_each_kind_holds_only_its_own_fields():
    from histoshift.config import FeatureModelCfg, ImageModelCfg

    head_only = {"head", "head_hidden", "head_l1", "feature_shift", "self_train_rounds", "feature_hed_views"}
    assert head_only <= set(FeatureModelCfg.model_fields) and not head_only & set(ImageModelCfg.model_fields)
    assert {"drop_path_rate", "train_last_blocks"} <= set(ImageModelCfg.model_fields) - set(
        FeatureModelCfg.model_fields
    )
    with pytest.raises(ConfigError, match="unknown config key 'model.head_hidden' for model.kind: image"):
        load_config(None, ["model.head_hidden=8"])
    with pytest.raises(ConfigError, match="model.kind: expected one of image, feature"):
        load_config(None, ["model.kind=frozen"])


def test_store_settings_moved_from_train_still_load(capsys):
    cfg = load_config(None, ["model.kind=feature", "train.feature_hed_views=4"])
    assert cfg.model.feature_hed_views == 4 and "feature_hed_views" not in cfg.train.model_dump()
    assert "moved to the model section" in capsys.readouterr().err


def test_registry_names_are_checked_by_load_experiment_not_by_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  recipe: uni3\n  weights: hub\n")
    assert load_config(path).model.recipe == "uni3"  # config.py imports no registry
    with pytest.raises(ConfigError, match="model.recipe: unknown foundation model 'uni3'"):
        load_experiment(path)


def test_settings_that_need_a_fine_tuned_backbone_are_refused_for_heads():
    with pytest.raises(ConfigError, match="unknown config key 'model.drop_path_rate' for model.kind: feature"):
        load_config(None, ["model.kind=feature", "model.drop_path_rate=0.1"])
    with pytest.raises(ConfigError, match="need a fine-tuned backbone"):
        load_config(None, ["model.kind=feature", "algorithm.consistency_weight=1"])


def test_a_run_without_a_recorded_kind_is_refused(tmp_path):
    from histoshift.lineage import StaleError
    from histoshift.runs import RunDir

    run = RunDir.of(tmp_path, "old", 0, 1)
    run.path.mkdir(parents=True)
    run.inputs.write_text('{"cache": {}, "folds": "x"}')
    with pytest.raises(StaleError, match="records no task kind"):
        run.kind
    run.inputs.write_text('{"task": "feature", "cache": {}, "folds": "x"}')
    assert run.kind == "feature"


@pytest.mark.slow
@pytest.mark.parametrize("root", ["finished", "pipeline_root"])
def test_features_are_what_the_head_predicts_from(root, request):
    # task.features (the report's feature map) gives, for either kind, the pooled features of the plain view that
    # the classifier's last layer turns into the plain view's logit
    import numpy as np
    import torch
    from accelerate import Accelerator

    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.runs import find_runs
    from histoshift.tasks import run_task

    path = request.getfixturevalue(root)
    run = find_runs(path / "work" / "runs")[0]
    cache = Cache.open(path / "work" / "cache")
    task, model = run_task(run, cache, Paths(path), Accelerator())
    table = cache.index.groupby("center").head(4).reset_index(drop=True)
    feats = task.features(model, table)
    assert feats.shape[0] == len(table) and feats.ndim == 2 and np.isfinite(feats).all()
    with torch.no_grad():
        logits = model.head(torch.from_numpy(feats)).squeeze(1).numpy()
    plain = task.predictor(table, views=1)(model)["v0"].to_numpy()
    np.testing.assert_allclose(logits, plain, atol=2e-2, rtol=1e-2)
