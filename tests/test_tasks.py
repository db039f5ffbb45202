"""The two kinds of model behind one protocol (tasks.py): the same methods, one place choosing the kind."""
from __future__ import annotations

import inspect

import pytest

from histoshift.config import ConfigError, load_config
from histoshift.tasks import TASKS, FeatureTask, ImageTask, load_experiment, task_kind

PROTOCOL = ("lineage", "stored_data", "build_model", "streams", "feed", "to_model", "predictor", "save", "load", "adapt")


def test_both_kinds_implement_the_whole_protocol_with_the_same_signatures():
    assert set(TASKS) == {"image", "feature"} and TASKS["image"] is ImageTask and TASKS["feature"] is FeatureTask
    for name in PROTOCOL:
        image, feature = getattr(ImageTask, name), getattr(FeatureTask, name)
        assert list(inspect.signature(image).parameters) == list(inspect.signature(feature).parameters), name
    assert list(inspect.signature(ImageTask).parameters) == list(inspect.signature(FeatureTask).parameters)


def test_the_config_chooses_the_kind():
    assert task_kind(load_config(None)) == "image"
    assert task_kind(load_config(None, ["model.frozen=true"])) == "feature"


def test_registry_names_are_checked_by_load_experiment_not_by_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  recipe: uni3\n  weights: hub\n")
    assert load_config(path).model.recipe == "uni3"  # config.py imports no registry
    with pytest.raises(ConfigError, match="model.recipe: unknown foundation model 'uni3'"):
        load_experiment(path)


def test_settings_that_need_a_fine_tuned_backbone_are_refused_for_heads():
    with pytest.raises(ConfigError, match="stochastic depth needs a fine-tuned backbone"):
        load_config(None, ["model.frozen=true", "model.drop_path_rate=0.1"])


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
