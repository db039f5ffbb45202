"""Files are input (issue 20): nothing in a run folder, a cache or a planted symlink makes the pipeline run
code, write outside its root or train on what it should not. Each test here fails on the code before it."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml

from histoshift import engine
from histoshift.cli import main
from histoshift.runs import RunDir
from test_faults import _one_error_line

TINY = {"name": "tiny", "model": {"backbone": "test_efficientnet", "weights": "none", "input_size": 64},
        "algorithm": {"name": "dann"}, "train": {"epochs": 2, "batch_size": 8, "target_batch_size": 8,
                                                 "steps_per_epoch": 3, "eval_batch_size": 64}}


class _Crash(Exception):
    """Stands for a process killed right after it saved an epoch."""


class _Payload:
    """Unpickling this creates a folder: the stand-in for any code a planted pickle could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _unfinished_run(prepared_root, tmp_path, monkeypatch) -> tuple[list[str], RunDir]:
    """A run that saved its epoch-1 state and died."""
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    argv = ["--root", str(root), "train", "--config", str(cfg), "--fold", "0"]
    real = engine.save_epoch_state

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(engine, "save_epoch_state", save_then_die)
    with pytest.raises(_Crash):
        main(argv)
    monkeypatch.setattr(engine, "save_epoch_state", real)
    run = RunDir.of(root / "work" / "runs", "tiny", 0, 0)
    assert not run.is_done and run.last_state() is not None
    return argv, run


def test_resume_never_unpickles_a_planted_custom_state(prepared_root, tmp_path, monkeypatch, capsys):
    """Accelerate reads custom-state files with weights_only=False: a run folder copied from someone else
    could run code on `train`. The loop's state is JSON now, no custom object is registered, and a state
    folder holding such files is refused before Accelerate sees it."""
    argv, run = _unfinished_run(prepared_root, tmp_path, monkeypatch)
    state = run.last_state()
    assert (state / engine.LOOP_STATE).exists() and not list(state.glob("custom_checkpoint_*"))
    marker = tmp_path / "payload-ran"
    for k in range(3):  # whatever index a registered object would have had
        torch.save(_Payload(str(marker)), state / f"custom_checkpoint_{k}.pkl")
    capsys.readouterr()
    assert main(argv) == 2  # refused: this repository never writes such files
    line = _one_error_line(capsys)
    assert "custom_checkpoint_0.pkl" in line and "train --force" in line
    assert not marker.exists() and not run.is_done
    for k in range(3):  # without them, the state resumes (from JSON, no pickle)
        (state / f"custom_checkpoint_{k}.pkl").unlink()
    assert main(argv) == 0
    assert run.is_done and "resuming after epoch 1 of 2" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_in_the_saved_state_is_refused_not_run(prepared_root, tmp_path, monkeypatch, capsys, name):
    argv, run = _unfinished_run(prepared_root, tmp_path, monkeypatch)
    state = run.last_state()
    marker = tmp_path / "payload-ran"
    torch.save({"states": _Payload(str(marker))}, state / name)
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert str(state) in line and "holds more than tensors" in line and "train --force" in line
    assert not marker.exists() and not run.is_done


def test_a_broken_loop_state_is_one_line(prepared_root, tmp_path, monkeypatch, capsys):
    argv, run = _unfinished_run(prepared_root, tmp_path, monkeypatch)
    (run.last_state() / engine.LOOP_STATE).write_text("{not json")
    capsys.readouterr()
    assert main(argv) == 2
    assert "loop.json: not a saved loop state" in _one_error_line(capsys)
