"""train.average: EMA, SWA and SWAD against hand computations, their saved states, batch norm refreshed for the
averaged weights, the config's refusals, and whole runs (summary, held-out loss, resume) through the train stage."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from helpers import FROZEN, IMAGE, _merge
from histoshift.averaging import make_averager, refresh_batchnorm, swad_window
from histoshift.config import ConfigError, load_config
from histoshift.config.sections import TrainCfg


def _linear() -> nn.Linear:
    return nn.Linear(2, 1, bias=False)


def _steps(averager, model, values, first_step=1, steps_per_epoch=None):
    """Sets the model's weight to each value in turn, as a step would, and tells the averager."""
    for i, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        averager.after_step(model, first_step + i)
        if steps_per_epoch and (i + 1) % steps_per_epoch == 0:
            averager.after_epoch(model, (i + 1) // steps_per_epoch)


def test_swad_window_is_the_lowest_loss_widened_within_the_tolerance():
    assert swad_window([0.9, 0.5, 0.55, 0.7, 0.52], 1.2) == [2, 3]  # bound 0.6: 0.9 and 0.7 end it
    assert swad_window([0.9, 0.5, 0.55, 0.7, 0.52], 1.5) == [2, 3, 4, 5]
    assert swad_window([0.4, 0.5, 0.6], 1.0) == [1]
    assert swad_window([0.3], 1.3) == [1]


def test_swa_is_the_uniform_mean_of_the_steps_after_its_start():
    model = _linear()
    avg = make_averager(model, TrainCfg(average="swa", epochs=2, average_start=0.5), steps_per_epoch=2)
    _steps(avg, model, [1.0, 2.0, 4.0, 8.0])  # steps 1..4 of 4: the last half averaged
    weights = avg.final(model, [0.5, 0.4])
    assert torch.allclose(weights["weight"], torch.full((1, 2), 6.0)) and avg.window == [2]


def test_swad_averages_the_steps_of_the_window_epochs_only():
    model = _linear()
    avg = make_averager(model, TrainCfg(average="swad", epochs=3, swad_tolerance=1.2), steps_per_epoch=2)
    _steps(avg, model, [1.0, 3.0, 10.0, 20.0, 100.0, 300.0], steps_per_epoch=2)
    weights = avg.final(model, [0.5, 0.45, 0.9])  # epochs 1-2 within 1.2 x 0.45; epoch 3 outside
    assert avg.window == [1, 2] and avg.reads_heldout_labels
    assert torch.allclose(weights["weight"], torch.full((1, 2), (1 + 3 + 10 + 20) / 4))


def test_ema_follows_timms_warm_up_decay():
    from timm.utils import ModelEmaV3

    model = _linear()
    with torch.no_grad():
        model.weight.fill_(0.0)
    avg = make_averager(model, TrainCfg(average="ema", ema_decay=0.9), steps_per_epoch=4)
    ramp = ModelEmaV3(_linear(), decay=0.9, use_warmup=True, warmup_power=0.75)
    expected = 0.0
    for step, v in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        d = ramp.get_decay(step)
        expected = d * expected + (1 - d) * v
        _steps(avg, model, [v], first_step=step)
    assert 0 < ramp.get_decay(4) < 0.9  # the ramp, not the full decay, for a short run
    assert torch.allclose(avg.final(model, [])["weight"], torch.full((1, 2), expected))
    assert avg.scored(model) is not model


def test_ema_works_with_a_timm_without_the_dtype_keyword(monkeypatch):
    # pyproject's floor (timm 1.0.9) predates ModelEmaV3's dtype keyword: the averager asks the signature
    import timm.utils

    real = timm.utils.ModelEmaV3

    class Older(real):
        def __init__(self, model, decay=0.9999, use_warmup=False, warmup_power=2 / 3):
            super().__init__(model, decay=decay, use_warmup=use_warmup, warmup_power=warmup_power)
    monkeypatch.setattr(timm.utils, "ModelEmaV3", Older)
    model = _linear()
    avg = make_averager(model, TrainCfg(average="ema", ema_decay=0.9), steps_per_epoch=2)
    assert isinstance(avg.ema, Older)
    _steps(avg, model, [1.0, 2.0])
    weights = avg.final(model, [])["weight"]
    assert weights.dtype == torch.float32 and 0 < float(weights[0, 0]) < 2


@pytest.mark.parametrize("name", ["ema", "swa", "swad"])
def test_a_saved_average_loads_into_a_new_averager_unchanged(name):
    model = _linear()
    cfg = TrainCfg(average=name, epochs=2, average_start=0.0)
    avg = make_averager(model, cfg, steps_per_epoch=2)
    _steps(avg, model, [1.0, 2.0, 5.0, 7.0], steps_per_epoch=2)
    state = avg.state()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    again = make_averager(_linear(), cfg, steps_per_epoch=2)
    again.load(state)
    a, b = avg.final(model, [0.3, 0.3]), again.final(model, [0.3, 0.3])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_statistics_are_recomputed_for_the_inputs():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3)), model[0].bias.zero_()
    x = torch.randn(64, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.5])
    assert refresh_batchnorm(model, iter([x[:32], x[32:]])) == 1
    bn = model[1]
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, (x[:32].var(0) + x[32:].var(0)) / 2, atol=1e-4)  # per batch, cumulative
    assert refresh_batchnorm(nn.Linear(3, 3), iter([x])) == 0


def test_average_with_early_stopping_or_an_unknown_name_is_refused(tmp_path):
    for train, words in ((dict(average="swad", early_stop_patience=2), "choose one"),
                         (dict(average="polyak"), "train.average")):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(_merge(FROZEN, {"train": train})))
        with pytest.raises(ConfigError, match=words):
            load_config(path)


def _train(root, config: dict, path, *extra) -> dict:
    from histoshift.cli import main

    path.write_text(yaml.safe_dump(config))
    assert main(["--root", str(root), "train", "--config", str(path), "--fold", "0", *extra]) == 0
    name = config.get("name") or path.stem
    return json.loads(next((root / "work" / "runs" / name).glob("seed0/fold0/summary.json")).read_text())


@pytest.mark.slow
def test_an_averaged_cnn_gets_its_batchnorm_refreshed_and_its_held_out_scores(prepared_root, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    summary = _train(root, _merge(IMAGE, {"train": {"average": "ema", "epochs": 2}}), tmp_path / "ema.yaml")
    assert summary["average"] == "ema" and summary["batchnorm_refreshed"] > 0 and summary["window"] == []
    metrics = [json.loads(l) for l in (root / "work/runs/ema/seed0/fold0/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["heldout_loss"] > 0 for m in metrics)


@pytest.mark.slow
def test_swad_resumes_with_its_averages(prepared_root, tmp_path, monkeypatch):
    """A run stopped after its first epoch's state and resumed ends with the weights of an uninterrupted one."""
    import shutil

    from histoshift import checkpoint, engine
    from safetensors.torch import load_file

    config = _merge(FROZEN, {"train": {"average": "swad", "epochs": 3}})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for r in (whole, cut):
        shutil.copytree(prepared_root, r)
    summary = _train(whole, config, tmp_path / "swad.yaml")
    assert summary["average"] == "swad" and summary["window"] and summary["batchnorm_refreshed"] == 0

    real = checkpoint.save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # killed after the first epoch's state
    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    (tmp_path / "swad.yaml").write_text(yaml.safe_dump(config))
    from histoshift.cli import main
    with pytest.raises(KeyboardInterrupt):
        main(["--root", str(cut), "train", "--config", str(tmp_path / "swad.yaml"), "--fold", "0"])
    state = next((cut / "work/runs/swad/seed0/fold0").glob("state-epoch1"))
    assert (state / engine.AVERAGE_WEIGHTS).is_file()
    monkeypatch.setattr(checkpoint, "save_state", real)
    resumed = _train(cut, config, tmp_path / "swad.yaml")
    assert resumed["window"] == summary["window"]
    a, b = (load_file(str(r / "work/runs/swad/seed0/fold0/model.safetensors")) for r in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_averaged_weights_are_the_ones_saved_and_scored(prepared_root, tmp_path, monkeypatch):
    """model.safetensors holds what the averager returned (not the last step's weights), and oof.csv is that
    model's held-out prediction."""
    import shutil

    import numpy as np
    import pandas as pd
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from histoshift import averaging
    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.runs import find_runs
    from histoshift.tasks import run_task

    returned = {}
    real = averaging.Swa.final

    def final(self, model, losses):
        out = real(self, model, losses)
        returned.update({k: v.detach().clone() for k, v in out.items()})
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert any(not torch.equal(last[k], out[k]) for k in out), "the average must differ from the last weights"
        return out
    monkeypatch.setattr(averaging.Swa, "final", final)
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    summary = _train(root, _merge(FROZEN, {"train": {"average": "swa", "epochs": 3, "average_start": 0.3}}),
                     tmp_path / "swa.yaml")
    assert summary["average"] == "swa" and returned
    run = find_runs(root / "work" / "runs")[0]
    saved = load_file(str(run.path / "model.safetensors"))
    assert saved.keys() == returned.keys() and all(torch.equal(saved[k], returned[k].cpu()) for k in saved)
    cache = Cache.open(root / "work" / "cache")
    task, model = run_task(run, cache, Paths(root), Accelerator())
    oof = pd.read_csv(run.path / "oof.csv")
    table = cache.index.set_index("id").loc[oof["id"]].reset_index()
    again = task.predictor(table, views=1)(model)
    np.testing.assert_allclose(oof["logit"].to_numpy(), again["v0"].to_numpy(), atol=1e-4)
