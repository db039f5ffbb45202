"""Fault injection (issue 10): bad HDF5 files, stale inputs, hand edits, two processes at once, a full
disk, a kill mid-fold. Each fault must end in exactly one `error:` line (exit 2) naming the file, id or
key, or be handled (recomputed, resumed); none may yield a silently wrong result or lose what a user
made. docs/reliability.md lists them, fault -> what the user sees."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file, save_file

from helpers import REPO, random_items, write_h5, tiny_config
from histoshift.cli import main
from histoshift.runs import RunDir, find_runs
from histoshift.safeio import Lock
from helpers import one_error_line


def _refused(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    line = one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    return line


# ---- bad HDF5 inputs: one line naming file and id ------------------------------------------------------

def _inputs(tmp_path, rng, train_extra: dict | None = None):
    d = tmp_path / "root" / "input"
    d.mkdir(parents=True)
    write_h5(d / "train.h5", random_items(rng, [10, 11], 0) | random_items(rng, [12], 3) | (train_extra or {}))
    write_h5(d / "val.h5", random_items(rng, [20], 1))
    write_h5(d / "test.h5", random_items(rng, [30, 31], 2))
    return d


def _set(path, key, name, value):
    with h5py.File(path, "a") as f:
        del f[key][name]
        f[key][name] = value


@pytest.mark.parametrize("name, value, fragment", [
    ("label", np.bytes_(b"1"), "label holds '1' of type |S1, expected 0 or 1"),
    ("label", np.array([0.5]), "label is 0.5, expected 0 or 1"),
    ("metadata", np.array([b"0", b"7"]), "metadata holds '0' of type |S1"),
    ("metadata", np.array([], dtype=np.int64), "metadata is empty"),
])
def test_string_or_wrong_labels_and_centers_are_refused(tmp_path, capsys, name, value, fragment):
    d = _inputs(tmp_path, np.random.default_rng(0))
    _set(d / "train.h5", "11", name, value)
    _refused(capsys, ["--root", str(d.parent), "prepare"], f"{d / 'train.h5'}, id 11: {fragment}")


@pytest.mark.parametrize("key", ["²", "１２", "007", str(2**64), "-3", "12a"])
def test_odd_id_names_are_refused(tmp_path, capsys, key):
    rng = np.random.default_rng(1)
    d = _inputs(tmp_path, rng)
    with h5py.File(d / "val.h5", "a") as f:
        f.copy(f["20"], key)
    _refused(
        capsys, ["--root", str(d.parent), "prepare"], f"{d / 'val.h5'}, id {key!r}: group name is not an integer id"
    )


def test_centers_that_break_the_contract_are_refused_unless_declared(tmp_path, capsys):
    rng = np.random.default_rng(2)
    d = _inputs(tmp_path, rng, train_extra=random_items(rng, [13], 2))  # the test center inside train.h5
    r = ["--root", str(d.parent), "prepare"]
    _refused(capsys, r, f"{d / 'train.h5'}, id 13: center 2 is not a train center of the contract", "--centers")
    assert not (d.parent / "work" / "cache").exists()
    assert main(r + ["--centers", "train=0,2,3;val=1;test=4"]) == 2  # test.h5 holds center 2, not 4
    assert "test.h5, id 30: center 2 is not a test center" in one_error_line(capsys)
    _refused(capsys, r + ["--centers", "train=0,3;test=0"], "train and test share a center")
    assert main(r + ["--centers", "any"]) == 0


# ---- stale results: a changed input is never reused in silence -------------------------------------------

def _rewrite_test_images(root):
    """test.h5 changed in place: same ids, other images (a corrected export, another stain...)."""
    with h5py.File(root / "input" / "test.h5", "a") as f:
        for key in list(f.keys())[:5]:
            f[key]["img"][...] = 1 - f[key]["img"][()]


@pytest.mark.slow
def test_a_changed_test_file_is_never_reused_in_silence(finished, tmp_path, capsys):
    """Before prepare every later stage refuses (the cache predates the file); after prepare the runs
    are refused (they trained with the old test images as DANN / target data), and so are their
    predictions and the stack's scores; retraining recomputes the whole chain."""
    r = ["--root", str(finished)]
    sub = (finished / "submissions" / "submission.csv").read_text()
    _rewrite_test_images(finished)
    for stage in (
        ["train", "--config", str(tmp_path / "head.yaml")],
        ["infer"],
        ["stack"],
        ["submit", "--allow-degenerate"],
    ):
        _refused(capsys, r + stage, "test.h5 changed since the cache was built")
    assert main(r + ["prepare"]) == 0
    _refused(capsys, r + ["train", "--config", str(tmp_path / "head.yaml")],
             "holds a finished run with other inputs (the cached test.h5", "--force")
    _refused(capsys, r + ["infer"], "was trained on another version of test.h5", "train --force")
    _refused(capsys, r + ["stack"], "was trained on another version of test.h5")
    _refused(capsys, r + ["submit", "--allow-degenerate"], "choice.json: computed from another cache")
    assert (finished / "submissions" / "submission.csv").read_text() == sub
    assert main(r + ["train", "--config", str(tmp_path / "head.yaml"), "--force"]) == 0
    assert main(r + ["infer"]) == 0 and main(r + ["stack"]) == 0
    assert main(r + ["submit", "--allow-degenerate"]) == 0
    assert len(list((finished / "submissions").glob("submission*.csv"))) in (1, 2)  # 2 when predictions changed


@pytest.mark.slow
def test_a_new_checkpoint_makes_its_predictions_stale(pipeline_root, capsys):
    """A checkpoint replaced after infer (another training, a copied file): stack refuses its TTA files,
    infer predicts them again (and says why), then stack accepts them."""
    run = find_runs(pipeline_root / "work" / "runs")[0]
    weights = load_file(str(run.checkpoint))
    key = next(k for k, v in weights.items() if v.is_floating_point() and k.startswith("head"))
    weights[key] = weights[key] * 0.5
    save_file(weights, str(run.checkpoint))
    stale = pd.read_csv(run.tta.test)
    r = ["--root", str(pipeline_root)]
    _refused(capsys, r + ["stack"], f"{run.path}: tta_heldout.csv, tta_test.csv missing or predicted from another "
                                    "checkpoint", "run the infer stage")
    assert main(r + ["infer"]) == 0
    assert "predate the current checkpoint or cache; predicting again" in capsys.readouterr().out
    assert not np.allclose(pd.read_csv(run.tta.test)["v0"], stale["v0"])
    assert main(r + ["infer"]) == 0 and "is up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_named(pipeline_root, capsys):
    run = find_runs(pipeline_root / "work" / "runs")[0]
    run.checkpoint.write_bytes(b"\x00" * 100)
    _refused(capsys, ["--root", str(pipeline_root), "infer"], f"{run.checkpoint}: cannot be read as safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda f: f.assign(fold=np.where(f.index % 7 == 0, 0, f.fold)),
            "placed in fold 0; leave-one-center-out needs fold = center",
        ),
        (lambda f: f.iloc[1:], "is a labelled patch of the cache but has no fold"),
        (lambda f: f.assign(label=1 - f.label), "label"),
        (lambda f: f.assign(fold="x"), "fold is 'x', expected an integer"),
    ],
)
def test_hand_edited_folds_are_refused_before_training_and_stacking(finished, tmp_path, capsys, edit, fragment):
    path = finished / "folds" / "folds.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)
    r = ["--root", str(finished)]
    _refused(
        capsys, r + ["train", "--config", str(tmp_path / "head.yaml"), "--fold", "1", "--force"], str(path), fragment
    )
    _refused(capsys, r + ["stack"], str(path), fragment)


# ---- configs and arguments ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("argv, fragment", [
    (["--fold", "x"], "--fold x: expected 'all' or comma-separated held-out centers [0, 1, 3, 4]"),
    (["optim.lr=nan"], "optim.lr: must be a finite number, got nan"),
    (["train.steps_per_epoch=-1"], "train.steps_per_epoch: must be >= 0, got -1"),
    (["optim.warmup_frac=2"], "optim.warmup_frac: must be <= 1.0"),
    (["train.epochs=0"], "train.epochs: must be >= 1"),
    (["optim.lr=[1"], "the value is not a valid YAML scalar"),
])
def test_bad_arguments_and_values_are_one_line(finished, tmp_path, capsys, argv, fragment):
    _refused(capsys, ["--root", str(finished), "train", "--config", str(tmp_path / "head.yaml")] + argv, fragment)


@pytest.mark.slow
def test_malformed_yaml_names_the_file_and_line(finished, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\n  weights: [none\n")
    _refused(capsys, ["--root", str(finished), "train", "--config", str(bad)], f"{bad}: line", "not valid YAML")


# ---- two processes at once --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_folder_in_use_is_refused(finished, tmp_path, capsys):
    run = RunDir.of(finished / "work" / "runs", "head", 0, 1)
    before = run.checkpoint.read_bytes()
    with Lock(run.lock, "test holder"):
        _refused(capsys, ["--root", str(finished), "train", "--config", str(tmp_path / "head.yaml"), "--fold", "1",
                          "--force"], f"the run {run.path} is in use by another process (pid {os.getpid()}")
    assert run.checkpoint.read_bytes() == before and not list(run.path.parent.glob("fold1.old-*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, lock",
    [
        (["prepare", "--force"], "work/.cache.lock"),
        (["folds"], "folds/.folds.lock"),
        (["stack"], "work/.stack.lock"),
        (["submit", "--allow-degenerate"], "submissions/.lock"),
    ],
)
def test_stages_in_use_are_refused(finished, capsys, stage, lock):
    with Lock(finished / lock, "test holder"):
        _refused(capsys, ["--root", str(finished)] + stage, "is in use by another process")


@pytest.mark.slow
def test_a_feature_store_being_embedded_elsewhere_is_refused(finished, tmp_path, capsys):
    """Two frozen configs with the same backbone share a store: one process embeds it at a time."""
    from histoshift.config import load_config
    from histoshift.data.cache import Cache
    from histoshift.features.store import feature_spec, store_key

    override = "train.feature_hed_views=1"  # a store that does not exist yet
    store = finished / "work" / "features" / store_key(feature_spec(load_config(tmp_path / "head.yaml", [override]),
                                                                  Cache.open(finished / "work" / "cache"), "no"))
    with Lock(store / ".lock", "test holder"):
        _refused(capsys, ["--root", str(finished), "train", "--config", str(tmp_path / "head.yaml"), "--fold", "1",
                          "--force", override], f"{store}: the feature store is being embedded by pid")
    assert not (store / "meta.json").exists()


@pytest.mark.slow
def test_a_second_training_process_is_refused_while_the_first_runs(prepared_root, tmp_path):
    """Two real processes: the second stops at once while the first holds the run. The first is given
    far more steps than the test waits for (no race on a busy machine), then killed: the lock dies with
    it and the next `train` starts the run over and finishes it."""
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump(SLOW))
    endless = "train.steps_per_epoch=1000000"
    first = _spawn(root, cfg, tmp_path / "first.err", endless)
    run = RunDir.of(root / "work" / "runs", "slow", 0, 0)
    _wait_for(lambda: run.config.exists(), first, tmp_path / "first.err")
    second = subprocess.run(
        _train_cmd(root, cfg, endless), capture_output=True, text=True, env=_env(), timeout=PATIENCE
    )
    assert second.returncode == 2 and f"the run {run.path} is in use by another process" in second.stderr
    assert first.poll() is None  # still training: the refusal was not a race
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = subprocess.run(_train_cmd(root, cfg, "train.epochs=1"), capture_output=True, text=True, env=_env(),
                           timeout=PATIENCE)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "holds an unfinished run" in third.stdout and run.is_done
    assert yaml.safe_load(run.config.read_text())["name"] == "slow"


# ---- crashes: kill -9 mid-fold resumes, a killed prepare leaves the old cache -----------------------------

SLOW = tiny_config(name="slow", algorithm={"name": "dann"},
                   train={"epochs": 3, "batch_size": 8, "steps_per_epoch": 40, "eval_batch_size": 64})


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _train_cmd(root, cfg, *overrides):
    return [
        sys.executable,
        "-m",
        "histoshift",
        "--root",
        str(root),
        "train",
        "--config",
        str(cfg),
        "--fold",
        "0",
        *overrides,
    ]


PATIENCE = 1800  # seconds: a bound for a hung child, never a speed requirement (CI machines may be busy)


def _spawn(root, cfg, err, *overrides):
    """A training process in the background; its stderr goes to the file `err` (a pipe nobody drains
    could fill and block the child)."""
    with open(err, "wb") as f:
        return subprocess.Popen(_train_cmd(root, cfg, *overrides), env=_env(), stdout=subprocess.DEVNULL, stderr=f)


def _wait_for(condition, proc, err, timeout=PATIENCE):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, open(err, errors="replace").read()[-2000:]
        assert time.time() - t0 < timeout, f"no progress in {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_mid_fold_resumes_with_the_same_weights_and_metrics(prepared_root, tmp_path):
    """kill -9 after the first saved epoch; the rerun continues from it and ends exactly where an
    uninterrupted run ends (CPU: weights and every metric but the wall time)."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump(SLOW))
    roots = {}
    for name in ("whole", "killed"):
        roots[name] = tmp_path / name
        shutil.copytree(prepared_root, roots[name])
    assert subprocess.run(_train_cmd(roots["whole"], cfg), env=_env(), capture_output=True).returncode == 0

    killed = RunDir.of(roots["killed"] / "work" / "runs", "slow", 0, 0)
    proc = _spawn(roots["killed"], cfg, tmp_path / "killed.err")
    _wait_for(lambda: killed.last_state() is not None, proc, tmp_path / "killed.err")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.is_done and killed.last_state() is not None
    saved = int(killed.last_state().name.removeprefix("state-epoch"))
    resumed = subprocess.run(_train_cmd(roots["killed"], cfg), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {saved} of 3" in resumed.stdout
    whole = RunDir.of(roots["whole"] / "work" / "runs", "slow", 0, 0)
    a, b = load_file(str(whole.checkpoint)), load_file(str(killed.checkpoint))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    def metrics(run):
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in run.metrics.read_text().splitlines()
        ]

    assert metrics(killed) == metrics(whole) and len(metrics(whole)) == 3
    assert pd.read_csv(killed.oof).equals(pd.read_csv(whole.oof))
    assert not list(killed.path.glob("state-epoch*"))  # removed once the run is done


@pytest.mark.slow
def test_a_killed_prepare_leaves_the_previous_cache(finished, tmp_path):
    """A prepare killed mid-build leaves a hidden building folder only; the next prepare removes it and
    the cache in use was never touched."""
    cache = finished / "work" / "cache"
    before = (cache / "manifest.json").read_text()
    with open(tmp_path / "prepare.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "histoshift", "--root", str(finished), "prepare", "--force"],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    _wait_for(lambda: list(cache.parent.glob(".cache.building-*")), proc, tmp_path / "prepare.err")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cache / "manifest.json").read_text() == before and main(["--root", str(finished), "stack"]) == 0
    assert main(["--root", str(finished), "prepare"]) == 0  # up to date: the old cache is still valid
    assert main(["--root", str(finished), "prepare", "--force"]) == 0
    assert not list(cache.parent.glob(".cache.building-*"))


# ---- full disks and unwritable folders --------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_checks_free_space_first(finished, monkeypatch, capsys):
    import histoshift.safeio as safeio

    monkeypatch.setattr(safeio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    cache = finished / "work" / "cache"
    before = (cache / "manifest.json").read_text()
    _refused(
        capsys,
        ["--root", str(finished), "prepare", "--force"],
        f"{cache.parent}: a new cache of",
        "free, the disk has 1.0 MB",
        f"deleting {cache} first frees its space",
    )
    assert (cache / "manifest.json").read_text() == before


@pytest.mark.slow
def test_a_disk_that_fills_during_prepare_is_one_line(finished, monkeypatch, capsys):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = finished / "work" / "cache"
    before = (cache / "manifest.json").read_text()
    _refused(capsys, ["--root", str(finished), "prepare", "--force"], "images_train.npy: cannot reserve",
             "No space left on device", "the previous cache is untouched")
    assert (cache / "manifest.json").read_text() == before
    assert not list(cache.parent.glob(".cache.building-*"))


@pytest.mark.slow
def test_an_unwritable_folder_is_one_line(finished, monkeypatch, capsys):
    def denied(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", denied)
    _refused(capsys, ["--root", str(finished), "stack"], "Permission denied; this stage needs to write there")


@pytest.mark.slow
def test_a_diverging_training_is_refused_and_not_marked_done(finished, tmp_path, capsys):
    r = ["--root", str(finished), "train", "--config", str(tmp_path / "head.yaml"), "--fold", "1", "--force"]
    _refused(capsys, r + ["optim.lr=1e30", "optim.grad_clip=0"], "non-finite", "not marked done")
    assert not RunDir.of(finished / "work" / "runs", "head", 0, 1).is_done


@pytest.mark.slow
def test_duplicate_ids_across_files_still_refused_after_parallel_read(tmp_path, capsys):
    """The reader processes return chunks in id order; a duplicate across files is still found."""
    rng = np.random.default_rng(5)
    d = _inputs(tmp_path, rng)
    write_h5(d / "test.h5", random_items(rng, [30, 10], 2))
    _refused(capsys, ["--root", str(d.parent), "prepare", "--workers", "2"], "test.h5, id 10: duplicate id")
