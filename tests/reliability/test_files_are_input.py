"""Files are input (issue 20): nothing in a run folder, a cache or a planted symlink makes the pipeline run
code, write outside its root or train on what it should not. Each test here fails on the code before it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml

from histoshift import checkpoint
from histoshift.stack.sets import ADAPTED
from histoshift.cli import main
from histoshift.runs import RunDir
from helpers import one_error_line, tiny_config

pytestmark = pytest.mark.slow  # tiny trainings, embeddings and stage runs (the quick tier trains nothing)

TINY = tiny_config(name="tiny", algorithm={"name": "dann"},
                   train={"epochs": 2, "batch_size": 8, "steps_per_epoch": 3, "eval_batch_size": 64})


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
    real = checkpoint.save_state

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(_Crash):
        main(argv)
    monkeypatch.setattr(checkpoint, "save_state", real)
    run = RunDir.of(root / "work" / "runs", "tiny", 0, 0)
    assert not run.is_done and run.last_state() is not None
    return argv, run


def test_resume_never_unpickles_a_planted_custom_state(prepared_root, tmp_path, monkeypatch, capsys):
    """Accelerate reads custom-state files with weights_only=False: a run folder copied from someone else
    could run code on `train`. The loop's state is JSON now, no custom object is registered, and a state
    folder holding such files is refused before Accelerate sees it."""
    argv, run = _unfinished_run(prepared_root, tmp_path, monkeypatch)
    state = run.last_state()
    assert (state / checkpoint.LOOP_STATE).exists() and not list(state.glob("custom_checkpoint_*"))
    marker = tmp_path / "payload-ran"
    for k in range(3):  # whatever index a registered object would have had
        torch.save(_Payload(str(marker)), state / f"custom_checkpoint_{k}.pkl")
    capsys.readouterr()
    assert main(argv) == 2  # refused: this repository never writes such files
    line = one_error_line(capsys)
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
    line = one_error_line(capsys)
    assert str(state) in line and "holds more than tensors" in line and "train --force" in line
    assert not marker.exists() and not run.is_done


def test_a_broken_loop_state_is_one_line(prepared_root, tmp_path, monkeypatch, capsys):
    argv, run = _unfinished_run(prepared_root, tmp_path, monkeypatch)
    (run.last_state() / checkpoint.LOOP_STATE).write_text("{not json")
    capsys.readouterr()
    assert main(argv) == 2
    assert "loop.json: not a saved loop state" in one_error_line(capsys)


# ---- nothing is written through a symlink ----------------------------------------------------------------

def test_a_lock_never_opens_a_symlink(tmp_path):
    from histoshift.safeio import Lock, LockError

    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / ".cache.lock").symlink_to(victim)
    with pytest.raises(LockError, match=r"\.cache\.lock: is a symbolic link"):
        with Lock(tmp_path / "work" / ".cache.lock", "the cache"):
            pass
    assert victim.read_text() == "precious"


def test_writes_replace_a_planted_link_never_its_target(tmp_path):
    import numpy as np

    from histoshift.safeio import reserve_npy, write_text

    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    for name in ("report.md", "features_train.npy"):
        (tmp_path / name).symlink_to(victim)
    write_text(tmp_path / "report.md", "new")
    arr = reserve_npy(tmp_path / "features_train.npy", (4, 3), np.float16, "a test")
    arr[:] = 1
    del arr
    assert victim.read_text() == "precious"
    assert not (tmp_path / "report.md").is_symlink() and (tmp_path / "report.md").read_text() == "new"
    assert not (tmp_path / "features_train.npy").is_symlink()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_submit_never_writes_through_a_symlink(finished, tmp_path, capsys):
    import pandas as pd

    subs = finished / "submissions"
    victim = tmp_path / "outside.csv"
    victim.write_text("precious")
    (subs / "submission.tmp").symlink_to(victim)  # the old fixed temporary name
    scores = finished / "work" / "stack" / "test_scores.csv"
    table = pd.read_csv(scores)
    table["pred"] = 1 - table["pred"]  # a new submission to write
    table.to_csv(scores, index=False)
    r = ["--root", str(finished), "submit", "--allow-degenerate"]
    assert main(r) == 0
    assert victim.read_text() == "precious"
    assert not (subs / "submission.csv").is_symlink()
    sub = pd.read_csv(subs / "submission.csv")
    assert dict(zip(sub["ID"], sub["Pred"])) == dict(zip(table["id"], table["pred"]))  # the new predictions
    # a symlink at submission.csv itself: refused, its target untouched
    (subs / "submission.csv").unlink()
    (subs / "submission.csv").symlink_to(victim)
    capsys.readouterr()
    assert main(r) == 2
    assert "submission.csv: is a symbolic link" in one_error_line(capsys)
    assert victim.read_text() == "precious"


# ---- run names are plain folder names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../../../x", "/some/abs/path", "a/b", "", 'a,b "c"', "..", ".hidden"])
def test_run_names_that_are_not_plain_folders_are_refused_before_training(prepared_root, tmp_path, capsys, name):
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["--root", str(root), "train", "--config", str(cfg), "--fold", "0", f"name={name}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: name: must be a plain folder") and repr(name) in line
    assert not (root / "work" / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == before


# ---- the feature store: checksums per chunk, the weights' content identity ----------------------------------

HEAD = tiny_config("feature", name="head", algorithm={"name": "dann"}, model={"head_hidden": 16},
                   train={"eval_batch_size": 32})


def _store(root):
    (path,) = (root / "work" / "features").iterdir()
    return path


@pytest.mark.parametrize("damage", ["random", "nan", "legacy-marker"])
def test_a_damaged_store_chunk_is_embedded_again_never_trained_on(prepared_root, tmp_path, capsys, damage):
    import numpy as np

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump(HEAD))
    embed = ["--root", str(root), "embed", "--config", str(cfg)]
    assert main(embed) == 0
    store = _store(root)
    good = np.load(store / "features_train.npy").copy()
    arr = np.load(store / "features_train.npy", mmap_mode="r+")  # header kept, bytes changed
    if damage == "random":
        arr[3:7] = np.random.default_rng(0).standard_normal(arr[3:7].shape).astype(np.float16)
    elif damage == "nan":
        arr[5] = np.nan
    else:  # a marker from before checksums (empty)
        (store / "progress" / "train-0").write_text("")
    arr.flush()
    del arr
    capsys.readouterr()
    assert main(embed) == 0
    assert "train-0 do not match their checksums; embedding again 1 chunk(s) (train-0)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(store / "features_train.npy"), good)  # CPU embedding is deterministic
    assert main(embed) == 0 and "checksums" not in capsys.readouterr().out  # verified now


def test_non_finite_features_from_the_backbone_are_one_line(prepared_root, tmp_path, monkeypatch, capsys):
    import numpy as np

    from histoshift.features import embedder as features

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump(HEAD))
    real = features.Embedder.__call__

    def overflow(self, images, n_views, seed, centers=None):
        out = real(self, images, n_views, seed, centers)
        out[2, 0, 0] = np.inf
        return out

    monkeypatch.setattr(features.Embedder, "__call__", overflow)
    assert main(["--root", str(root), "embed", "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert "non-finite features for train row 2" in line and "precision fp32 or bf16" in line
    assert not list((root / "work" / "features").iterdir())  # nothing stored, no half-made store folder


def test_weights_replaced_in_the_hub_cache_under_the_same_revision_reembed_and_stale_the_heads(
        hf_cache, prepared_root, tmp_path, capsys):
    """The store key covers the snapshot's revision; meta.json also records its files (blob, size, config text):
    weights replaced under the same revision embed again, and the heads trained on the old features refuse. (A
    blob edited in place is refused: test_verified_once.py.)"""
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin
    from helpers import fm_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    folder = write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(tmp_path / "c.yaml"), "--fold", "0"]) == 0
    meta = json.loads((_store(root) / "meta.json").read_text())
    assert "model.safetensors" in meta["weights_files"] and "config.json" in meta["weights_files"]
    other = write_standin(RECIPES["hoptimus0"], tmp_path / "other", layout="dir", seed=1)
    weights = folder / "model.safetensors"  # the snapshot's link now names another blob (the revision unchanged)
    data = (other / "model.safetensors").read_bytes()
    blob = weights.resolve().parent / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    weights.unlink()
    weights.symlink_to(os.path.relpath(blob, weights.parent))
    capsys.readouterr()
    assert main(r + ["embed", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "model.safetensors changed in the Hugging Face cache since the store was embedded" in capsys.readouterr().out
    assert len(list((root / "work" / "features").iterdir())) == 1  # same key, embedded again
    assert main(r + ["infer"]) == 2
    assert "the stored train features (embedded again since)" in one_error_line(capsys)
    # a config.json edited in place (its text): embedded again as well
    config = folder / "config.json"
    config.resolve().write_text(config.read_text().replace("{", '{"edited": true, ', 1))
    assert main(r + ["embed", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "config.json changed in the Hugging Face cache" in capsys.readouterr().out


# ---- input change detection by content ---------------------------------------------------------------------

def test_prepare_verify_catches_a_same_size_same_time_edit(prepared_root, tmp_path, capsys):
    import h5py

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    assert main(["--root", str(root), "prepare"]) == 0  # the manifest records the files' paths: a copy rebuilds once
    old_id = json.loads((root / "work" / "cache" / "manifest.json").read_text())["cache_id"]
    test_h5 = root / "input" / "test.h5"
    st = test_h5.stat()
    with h5py.File(test_h5, "r+") as f:
        key = sorted(f.keys())[0]
        f[key]["img"][...] = 1.0 - f[key]["img"][...]  # pixels changed, the file's size kept
    os.utime(test_h5, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert test_h5.stat().st_size == st.st_size
    capsys.readouterr()
    assert main(["--root", str(root), "prepare"]) == 0  # the change time moved: the bytes are compared
    assert "test.h5 changed since the cache was built (in place: same size and modification time" in \
        capsys.readouterr().out
    assert main(["--root", str(root), "prepare", "--verify"]) == 0  # rebuilt: the bytes are the cache's now
    assert "up to date (file contents verified)" in capsys.readouterr().out
    new_id = json.loads((root / "work" / "cache" / "manifest.json").read_text())["cache_id"]
    assert new_id != old_id
    assert main(["--root", str(root), "prepare", "--verify"]) == 0
    assert "up to date (file contents verified)" in capsys.readouterr().out


# ---- report lineage, free space before training, adaptation needs enough patches ---------------------------

def test_report_refuses_stale_inputs_like_every_other_stage(finished, capsys):
    r = ["--root", str(finished), "report"]
    assert main(r) == 0
    choice = finished / "work" / "stack" / "choice.json"
    saved = choice.read_text()
    edited = json.loads(saved)
    name = next(iter(edited["lineage"]["checkpoints"]))
    edited["lineage"]["checkpoints"][name] = "0" * 16  # as if that fold had been retrained since the stack
    choice.write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(r) == 2
    line = one_error_line(capsys)
    assert str(choice) in line and name in line and "rerun infer and stack" in line
    choice.write_text(saved)
    test_h5 = finished / "input" / "test.h5"
    os.utime(test_h5, ns=(test_h5.stat().st_atime_ns, test_h5.stat().st_mtime_ns + 10**9))
    assert main(r) == 2
    assert "test.h5 changed since the cache was built" in one_error_line(capsys)


def test_report_draws_no_map_for_a_diverged_model(pipeline_root, capsys):
    from safetensors.torch import load_file, save_file

    from histoshift.runs import find_runs

    (run,) = find_runs(pipeline_root / "work" / "runs")
    weights = {k: (v.float() * float("nan")).to(v.dtype) if v.is_floating_point() else v
               for k, v in load_file(str(run.checkpoint)).items()}
    save_file(weights, str(run.checkpoint))
    assert main(["--root", str(pipeline_root), "report"]) == 0
    report = (pipeline_root / "work" / "report" / "report.md").read_text()
    assert "its features are not finite (the model diverged" in report


def test_free_space_for_the_fold_is_checked_before_training(prepared_root, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from histoshift import safeio

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safeio.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 4 * 2**20, 4 * 2**20))
    capsys.readouterr()
    assert main(["--root", str(root), "train", "--config", str(cfg), "--fold", "0"]) == 2
    out, err = capsys.readouterr()
    assert "training this fold" in err and "free some space" in err
    assert '"epoch": 1' not in out  # refused before the first step, not after the fold trained
    run = RunDir.of(root / "work" / "runs", "tiny", 0, 0)
    assert not run.metrics.exists() and run.last_state() is None


def test_a_center_too_small_to_adapt_to_keeps_its_plain_predictions(pipeline_root, monkeypatch, capsys):
    import pandas as pd

    from histoshift.runs import find_runs
    from histoshift.stages import infer

    monkeypatch.setattr(infer, "MIN_ADAPT_PATCHES", 1000)  # every center of the tiny data is "small"
    assert main(["--root", str(pipeline_root), "infer", "--adapt"]) == 0
    out = capsys.readouterr().out
    assert "fewer than 1000: not adapted" in out
    (run,) = find_runs(pipeline_root / "work" / "runs")
    pd.testing.assert_frame_equal(pd.read_csv(run.tta.path("test", ADAPTED)), pd.read_csv(run.tta.test))
    assert run.tta.adapted_layers() == 0


# ---- the unclear outcomes: one line each, no half-built folder ---------------------------------------------

def test_a_root_that_is_a_file_and_a_negative_seed_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["--root", str(tmp_path / "afile"), "prepare"]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(["--root", str(tmp_path), "demo-data", "--seed", "-1"])
    assert e.value.code == 2 and "--seed: expected a non-negative integer, got '-1'" in capsys.readouterr().err
    from histoshift.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.seed: must be >= 0, got -1"):
        load_config(overrides=["train.seed=-1"])


def test_score_with_a_labels_file_of_other_columns_is_one_line(finished, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,y\n1,0\n")
    assert main(["--root", str(finished), "score", "--labels", str(labels)]) == 2
    line = one_error_line(capsys)
    assert str(labels) in line and "no column ID or label (columns: id, y)" in line


def test_a_full_disk_while_creating_the_memory_map_names_the_file(finished, monkeypatch, capsys):
    import errno

    import numpy as np

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array_header_2_0", full)  # the first write of a new array
    cache = finished / "work" / "cache"
    before = (cache / "manifest.json").read_text()
    assert main(["--root", str(finished), "prepare", "--force"]) == 2
    line = one_error_line(capsys)
    assert "images_train.npy: cannot reserve" in line and "No space left on device" in line
    assert (cache / "manifest.json").read_text() == before and not list(cache.parent.glob(".cache.building-*"))


def test_foundation_failures_name_the_file_and_leave_no_store_folder(hf_cache, prepared_root, tmp_path, capsys):
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin
    from helpers import fm_config

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    folder = write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    embed = ["--root", str(root), "embed", "--config", str(tmp_path / "c.yaml")]
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00" + os.urandom(4095))  # random bytes (not starting like a pickle)
    for extra, fragment in (
        (["model.recipe_overrides={input_size: 100}"], "takes 224x224 inputs"),
        ([f"model.weights=file:{garbage}"], f"{garbage}: neither a safetensors file nor a torch checkpoint"),
    ):
        assert main(embed + extra) == 2
        assert fragment in one_error_line(capsys)
        assert not (root / "work" / "features").exists() or not list((root / "work" / "features").iterdir())
    config = (folder / "config.json").resolve()
    text = json.loads(config.read_text())
    config.write_text(json.dumps({**text, "architecture": "vit_small_patch16_224", "model_args": {}}))
    assert main(embed) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'config.json'}: H-optimus-0 cannot be built or loaded" in line and "hub failed" not in line


def test_prepare_force_rebuilds_a_cache_folder_that_is_a_mount_point(finished, monkeypatch, capsys):
    cache = finished / "work" / "cache"
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(cache) or real(p))

    def no_rename_of_a_mount(self, target, _rename=type(cache).rename):
        if os.fspath(self) == os.fspath(cache):
            raise OSError(16, "Device or resource busy", os.fspath(self))
        return _rename(self, target)

    monkeypatch.setattr(type(cache), "rename", no_rename_of_a_mount)
    before = json.loads((cache / "manifest.json").read_text())["cache_id"]
    assert main(["--root", str(finished), "prepare", "--force"]) == 0
    assert json.loads((cache / "manifest.json").read_text())["cache_id"] == before
    assert not list(cache.glob(".building-*")) and not list(cache.parent.glob(".cache.building-*"))
    assert not list(cache.parent.glob(".cache.old-*"))
    assert main(["--root", str(finished), "stack"]) == 0  # the rebuilt cache serves the next stages


def test_a_state_is_saved_beside_and_renamed_in_never_through_a_planted_link(tmp_path, monkeypatch):
    """save_state writes into a new hidden folder and renames it into place: a link planted at the state's name
    (before or while Accelerate writes) is never written through; a save a crash left half-written is cleared."""
    from accelerate import Accelerator

    from histoshift import checkpoint

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 1))
    run = tmp_path / "run"
    run.mkdir()
    (run / ".state-epoch1.abc.tmp").mkdir()  # left by a killed save
    target = tmp_path / "elsewhere"
    target.mkdir()
    folder = run / "state-epoch2"
    real = acc.save_state

    def plant_then_save(path):  # the link appears after the old folder was cleared, as in a race
        folder.symlink_to(target)
        real(path)

    monkeypatch.setattr(acc, "save_state", plant_then_save)
    checkpoint.save_state(acc, folder, {"epoch": 2}, 0, "a state")
    assert not list(target.iterdir())  # nothing written through the link
    assert folder.is_dir() and not folder.is_symlink() and (folder / checkpoint.COMPLETE).exists()
    assert json.loads((folder / checkpoint.LOOP_STATE).read_text()) == {"epoch": 2}
    assert sorted(p.name for p in run.iterdir()) == ["state-epoch2"]
    assert model is not None
