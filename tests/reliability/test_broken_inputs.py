"""A broken download at every stage that opens an input file: random bytes, a truncated file, an empty file, a file
of another type, a missing file. Each ends in one `error:` line naming the file (exit 2), nothing written."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from histoshift.cli import main

from helpers import one_error_line


def _break(path, how: str) -> None:
    data = path.read_bytes() if path.exists() else b""
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "another type":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif how == "no groups":
        with h5py.File(path, "w") as f:
            f["img"] = np.zeros(3)  # an HDF5 file, but a dataset where groups belong
    elif how == "missing":
        path.unlink()


KINDS = ["random bytes", "truncated", "empty", "another type", "no groups", "missing"]


def _root(demo_root, tmp_path, which: str, how: str):
    root = tmp_path / "root"
    shutil.copytree(demo_root / "input", root / "input")
    _break(root / "input" / which, how)
    return root


@pytest.mark.parametrize("how", KINDS)
def test_preflight_stops_at_a_broken_input_file(demo_root, tmp_path, capsys, how):
    root = _root(demo_root, tmp_path, "train.h5", how)
    config = tmp_path / "c.yaml"
    config.write_text("model: {backbone: test_efficientnet, weights: none, input_size: 64}\n")
    assert main(["--root", str(root), "preflight", "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert str(root / "input" / "train.h5") in line, line
    assert not (root / "work").exists()


@pytest.mark.parametrize("how", KINDS)
@pytest.mark.parametrize("which", ["train.h5", "test.h5"])
def test_prepare_stops_at_a_broken_input_file(demo_root, tmp_path, capsys, how, which):
    root = _root(demo_root, tmp_path, which, how)
    assert main(["--root", str(root), "prepare"]) == 2
    line = one_error_line(capsys)
    assert str(root / "input" / which) in line, line
    assert not (root / "work" / "cache").exists()


@pytest.mark.parametrize("how", KINDS)
def test_prepare_verify_names_a_file_broken_after_the_cache_was_built(prepared_root, tmp_path, capsys, how):
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    manifest = (root / "work" / "cache" / "manifest.json").read_bytes()
    _break(root / "input" / "val.h5", how)
    assert main(["--root", str(root), "prepare", "--verify"]) == 2
    line = one_error_line(capsys)
    assert str(root / "input" / "val.h5") in line, line
    assert (root / "work" / "cache" / "manifest.json").read_bytes() == manifest  # the old cache is kept


@pytest.mark.parametrize("how", ["random bytes", "truncated", "empty", "another type", "missing"])
def test_score_names_a_broken_labels_file(tmp_path, capsys, how):
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "submission.csv").write_text("ID,Pred\n1,0\n2,1\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("ID,label\n1,0\n2,1\n")
    _break(labels, how)
    assert main(["--root", str(tmp_path), "score", "--labels", str(labels)]) == 2
    assert str(labels) in one_error_line(capsys)


def test_score_without_a_submission_names_it(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("ID,label\n1,0\n")
    assert main(["--root", str(tmp_path), "score", "--labels", str(labels)]) == 2
    assert str(tmp_path / "submissions" / "submission.csv") in one_error_line(capsys)


@pytest.mark.parametrize("what", ["object header", "symbol table"])
def test_bytes_overwritten_inside_the_files_structure_are_one_line(demo_root, tmp_path, capsys, what):
    """4 KB of random bytes inside train.h5, its size kept, hitting one group's object header or the root group's
    symbol table: prepare, prepare --verify (on a cache built before the damage) and preflight each stop in one
    line naming the file (and the id, where the damage sits in a group), exit 2. Before, a 52-line h5py traceback
    and preflight's "1 config(s) ready"."""
    root = tmp_path / "root"
    shutil.copytree(demo_root / "input", root / "input")
    r = ["--root", str(root)]
    assert main(r + ["prepare"]) == 0
    path = root / "input" / "train.h5"
    size = path.stat().st_size
    with h5py.File(path, "r") as f:
        key = sorted(f.keys())[len(f) // 2]
        header = h5py.h5o.get_info(f[key].id).addr
    # or a symbol table node of the root group (HDF5's signature "SNOD"), past the middle of the file
    at = header if what == "object header" else path.read_bytes().find(b"SNOD", size // 2)
    assert at > 0
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size
    for argv in (["prepare", "--verify"], ["prepare", "--force"], ["preflight", "--config", "configs/lite0_dann.yaml"]):
        capsys.readouterr()
        assert main(r + argv) == 2, argv
        line = one_error_line(capsys)
        assert f"{path}" in line and "the HDF5 file is damaged inside" in line, (argv, line)
        if what == "object header":
            assert f", id " in line, line
