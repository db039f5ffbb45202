"""A feature store damaged after a head was trained on it: a chunk's bytes, the array's header or its length.
The store is verified (and the damaged part embedded again) before a run's recorded content is compared, so a
head is never applied to features other than those it was trained on, and no traceback names no file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from histoshift.cli import main

from helpers import one_error_line

pytestmark = pytest.mark.slow  # every test starts from the finished root (a trained head)


def _store(root):
    (store,) = [p for p in (root / "work" / "features").iterdir() if p.is_dir()]
    return store


def test_a_chunk_embedded_again_with_other_bytes_makes_the_run_stale(finished, monkeypatch, capsys):
    """GPU embeddings are not bit-reproducible: a damaged chunk embedded again may differ from what the head saw."""
    from histoshift.features import embedder

    store = _store(finished)
    arr = np.load(store / "features_test.npy", mmap_mode="r+")
    arr[0] = 0  # bytes changed, header kept: the chunk fails its checksum
    arr.flush()
    del arr
    real = embedder.Embedder.__call__
    monkeypatch.setattr(embedder.Embedder, "__call__",
                        lambda self, *a, **k: real(self, *a, **k) + np.float16(0.01))  # "another GPU"
    assert main(["--root", str(finished), "infer", "--force"]) == 2
    line = one_error_line(capsys)
    assert "the stored features (embedded again since)" in line and "retrain" in line, line


def test_a_chunk_embedded_again_with_the_same_bytes_is_used(finished, capsys):
    store = _store(finished)
    arr = np.load(store / "features_test.npy", mmap_mode="r+")
    arr[0] = 0
    arr.flush()
    del arr
    assert main(["--root", str(finished), "infer", "--force"]) == 0  # CPU: the same bytes again
    assert "do not match their checksums; embedding that again" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_store_file_with_a_damaged_header_or_length_is_embedded_again(finished, capsys, damage):
    store = _store(finished)
    path = store / "features_val.npy"
    good = np.load(path).copy()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    assert main(["--root", str(finished), "infer", "--force"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "embedding that again" in out, out
    np.testing.assert_array_equal(np.load(path), good)


def test_logs_are_never_appended_through_a_planted_link(tmp_path):
    """metrics.jsonl is appended with O_NOFOLLOW (engine.fit: safeio.append_text): a planted link is refused in one
    line, its target untouched; a plain file is appended to."""
    from histoshift import engine
    from histoshift.safeio import LinkError, append_text

    assert engine.append_text is append_text
    target = tmp_path / "elsewhere.txt"
    target.write_text("mine\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(target)
    with pytest.raises(LinkError, match="is a symbolic link"):
        append_text(link, "{}\n")
    assert target.read_text() == "mine\n"
    append_text(tmp_path / "plain.jsonl", "a\n")
    append_text(tmp_path / "plain.jsonl", "b\n")
    assert (tmp_path / "plain.jsonl").read_text() == "a\nb\n"


def test_the_features_memory_map_is_never_opened_through_a_link(finished, tmp_path):
    from histoshift.safeio import LinkError, open_npy

    store = _store(finished)
    target = tmp_path / "elsewhere.npy"
    np.save(target, np.zeros((2, 2), dtype=np.float16))
    link = store / "features_link.npy"
    link.symlink_to(target)
    with pytest.raises(LinkError, match="is a symbolic link"):
        open_npy(link, "r+")
    assert json.loads((store / "meta.json").read_text())  # the store itself untouched
