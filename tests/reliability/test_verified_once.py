"""Every byte verified once: what a full check found whole is recorded (verified.py), so a later stage, fold or
process only stats the file. Counted here as full reads per stage (what strace showed: the store hashed once per
fold in every process, the inputs hashed by every `prepare --verify`)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from histoshift.cli import main

from helpers import fm_config, one_error_line


def _count_hashed(monkeypatch) -> list[str]:
    """The names of the files hashed in full (every content check reads through hashlib.file_digest)."""
    hashed, real = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, d: hashed.append(Path(f.name).name) or real(f, d))
    return hashed


def test_inputs_are_read_once_per_change_not_per_stage(prepared_root, tmp_path, monkeypatch):
    """A copied root (new inodes and change times): the first stage reads each input once; `prepare --verify`
    and the stages after it only stat them; a file written since is read again (and only that one)."""
    from histoshift.data import cache

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    reads = _count_hashed(monkeypatch)
    per_stage = []
    for argv in (["prepare", "--verify"], ["prepare", "--verify"], ["folds"], ["prepare", "--verify"]):
        cache._DIGESTS.clear()  # each stage its own process
        assert main(["--root", str(root), *argv]) == 0
        per_stage.append(sorted(reads))
        reads.clear()
    assert per_stage == [["test.h5", "train.h5", "val.h5"], [], [], []]
    (root / "input" / "val.h5").chmod(0o644)  # a change time that moved: these bytes are read again, once
    cache._DIGESTS.clear()
    assert main(["--root", str(root), "prepare", "--verify"]) == 0 and reads == ["val.h5"]


@pytest.mark.slow
def test_the_store_is_read_once_not_once_per_fold_and_stage(finished, monkeypatch):
    from histoshift.features import rows

    real, read = rows.NpyRows.raw, []
    monkeypatch.setattr(
        rows.NpyRows, "raw", lambda self, a, b: read.append((b - a) * self.row_bytes) or real(self, a, b)
    )
    (store,) = [p for p in (finished / "work" / "features").iterdir() if p.is_dir()]
    size = sum(p.stat().st_size - 128 for p in store.glob("features_*.npy"))  # rows, without the .npy headers
    per_stage = []
    for argv in (["infer", "--force"], ["infer", "--force"], ["train", "--force", "--config",
                                                               str(finished.parent / "head.yaml")]):
        assert main(["--root", str(finished), *argv]) == 0
        per_stage.append(sum(read))
        read.clear()
    assert per_stage == [size, 0, 0]  # 4 folds each: the copy is checked once, then only stat-ed


@pytest.mark.slow
def test_a_hub_cache_copied_without_its_times_is_reused(hf_cache, prepared_root, tmp_path, monkeypatch, capsys):
    """A Kaggle dataset of the hub cache is such a copy: other modification and change times, the same blobs. The
    store is reused (nothing embedded again, the heads stay valid); each blob is hashed once against its name."""
    import huggingface_hub.constants as constants

    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import write_standin

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    write_standin(RECIPES["hoptimus0"], hf_cache)
    fm_config(tmp_path / "c.yaml", "hoptimus0")
    r = ["--root", str(root)]
    assert main(r + ["train", "--config", str(tmp_path / "c.yaml"), "--fold", "0"]) == 0
    copy = tmp_path / "hf-copy"
    shutil.copytree(hf_cache, copy, symlinks=True, copy_function=shutil.copyfile)  # no times kept
    shutil.rmtree(hf_cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(copy))
    hashed = _count_hashed(monkeypatch)
    capsys.readouterr()
    assert main(r + ["infer"]) == 0
    out = capsys.readouterr().out
    assert "changed in the Hugging Face cache" not in out and "embedding again" not in out, out
    first = len(hashed)
    assert first >= 1  # the weights blob, once
    assert main(r + ["infer", "--force"]) == 0 and len(hashed) == first  # recorded: only stat-ed now
    blob = next(p for p in (copy / "models--bioptimus--H-optimus-0" / "blobs").iterdir() if p.stat().st_size > 10000)
    with open(blob, "r+b") as f:  # edited in place, same size: its change time moved, so it is hashed, and refused
        f.seek(100)
        f.write(b"\x00" * 8)
    assert main(r + ["infer", "--force"]) == 2
    assert "does not match its content hash" in one_error_line(capsys)
