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
    assert "the stored test features (embedded again since)" in line and "retrain" in line, line


def test_a_chunk_embedded_again_with_the_same_bytes_is_used(finished, capsys):
    store = _store(finished)
    arr = np.load(store / "features_test.npy", mmap_mode="r+")
    arr[0] = 0
    arr.flush()
    del arr
    assert main(["--root", str(finished), "infer", "--force"]) == 0  # CPU: the same bytes again
    out = capsys.readouterr().out
    assert "chunk(s) test-0 do not match their checksums; embedding again 1 chunk(s) (test-0), meta.json" in out, out


def _other_gpu(monkeypatch):
    """Embeddings that differ from the first ones (GPU kernels are not bit-reproducible)."""
    from histoshift.features import embedder

    real = embedder.Embedder.__call__
    monkeypatch.setattr(embedder.Embedder, "__call__", lambda self, *a, **k: real(self, *a, **k) + np.float16(0.01))


def _snapshot(store):
    return {p.name: p.read_bytes() for p in [*store.glob("features_*.npy"), *(store / "progress").iterdir()]}


@pytest.mark.parametrize("damage", ["truncated", "header", "missing"])
def test_a_damaged_split_file_costs_that_split_alone(finished, capsys, monkeypatch, damage):
    """Re-embedded with other bytes (as on a GPU), the val split comes back alone: the train and test files and
    their chunk markers are the bytes they were (the old code deleted and embedded all three); the message says
    what is embedded again and why; the runs that read val are refused naming it."""
    store = _store(finished)
    before = _snapshot(store)
    path = store / "features_val.npy"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    _other_gpu(monkeypatch)
    assert main(["--root", str(finished), "embed", "--config", str(finished.parent / "head.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"{path}: " in out and "embedding again the val split's file, meta.json (the rest is kept" in out, out
    after = _snapshot(store)
    assert sorted(after) == sorted(before)
    kept = [n for n in before if "val" not in n]
    assert len(kept) >= 4 and all(after[n] == before[n] for n in kept)
    assert after["features_val.npy"] != before["features_val.npy"]  # embedded again, with the new bytes
    assert main(["--root", str(finished), "infer", "--force"]) == 2
    assert "the stored val features (embedded again since)" in one_error_line(capsys)


def test_a_damaged_meta_json_costs_meta_json_alone(finished, capsys, monkeypatch):
    """Its chunks are verified and kept: no feature is embedded again, so every head stays valid."""
    store = _store(finished)
    before = _snapshot(store)
    (store / "meta.json").write_text('{"spec": {"vie')
    _other_gpu(monkeypatch)
    assert main(["--root", str(finished), "infer", "--force"]) == 0
    out = capsys.readouterr().out
    assert "meta.json: not the store's record (JSONDecodeError); embedding again meta.json" in out, out
    assert _snapshot(store) == before
    assert json.loads((store / "meta.json").read_text())["spec"]["views"] == 8


def test_a_read_the_system_refuses_deletes_nothing(finished, capsys, monkeypatch):
    """EIO (or EACCES, EMFILE) while the store is opened: one line naming the file, exit 2, every file kept."""
    import errno

    store = _store(finished)
    before = _snapshot(store)
    real = np.load

    def failing(file, *a, **k):
        if str(file).endswith("features_val.npy"):
            raise OSError(errno.EIO, "Input/output error")
        return real(file, *a, **k)

    monkeypatch.setattr(np, "load", failing)
    assert main(["--root", str(finished), "infer", "--force"]) == 2
    line = one_error_line(capsys)
    assert "features_val.npy: cannot be read now (OSError: Input/output error); nothing was deleted" in line, line
    assert _snapshot(store) == before and (store / "meta.json").exists()


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


def _hold(store, mode):
    """Another process holding the store's lock as a reader (a head training on it) or as `embed` does."""
    import subprocess
    import sys

    code = (f"import sys; from histoshift.features.lock import StoreLock; StoreLock.of({str(store)!r}).{mode}(); "
            "print('held', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_no_repair_under_a_reader_and_no_reading_during_a_rebuild(finished, capsys):
    """Two processes: while one reads the store, a repair in another is refused before it deletes anything; while
    one embeds it, a head's stage is refused before it reads anything; each in one line naming the other side."""
    store = _store(finished)
    arr = np.load(store / "features_test.npy", mmap_mode="r+")
    arr[0] = 0  # a chunk to repair
    arr.flush()
    del arr
    before = _snapshot(store)
    reader = _hold(store, "shared")
    try:
        assert main(["--root", str(finished), "embed", "--config", str(finished.parent / "head.yaml")]) == 2
        line = one_error_line(capsys)
        assert "the feature store is read by another process (a head training or predicting on it)" in line, line
        assert _snapshot(store) == before and (store / "meta.json").exists()
    finally:
        reader.communicate("\n")
    writer = _hold(store, "exclusive")
    try:
        assert main(["--root", str(finished), "infer", "--force"]) == 2
        line = one_error_line(capsys)
        assert f"is being embedded or rebuilt by embed, pid {writer.pid}" in line, line
    finally:
        writer.communicate("\n")
    assert main(["--root", str(finished), "infer", "--force"]) == 0  # nobody else: repaired (CPU: same bytes)


def test_a_resumed_fold_refuses_features_embedded_again_since_its_saved_epoch(prepared_root, tmp_path, monkeypatch,
                                                                             capsys):
    """A head killed after epoch 1; a chunk of its store then damaged and embedded again with other bytes: the rerun
    does not continue the saved epoch on new features (it did: the stamp was compared before the store was
    verified), it stops in one line."""
    import shutil

    import yaml

    from histoshift import checkpoint
    from histoshift.runs import RunDir

    from helpers import FROZEN

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump(FROZEN))
    real = checkpoint.save_state

    def killed(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # after the first saved epoch

    monkeypatch.setattr(checkpoint, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--root", str(root), "train", "--config", str(cfg), "--fold", "0"])
    monkeypatch.setattr(checkpoint, "save_state", real)
    run = RunDir.of(root / "work" / "runs", "head", 0, 0)
    assert run.last_state() is not None and not run.is_done
    store = _store(root)
    arr = np.load(store / "features_train.npy", mmap_mode="r+")
    arr[0] = 0
    arr.flush()
    del arr
    _other_gpu(monkeypatch)
    capsys.readouterr()
    assert main(["--root", str(root), "train", "--config", str(cfg), "--fold", "0"]) == 2
    line = one_error_line(capsys)
    assert "the stored train features (embedded again since) changed while the fold was interrupted" in line, line


def test_an_embed_rerun_says_where_it_resumes_and_a_leftover_temporary_file_is_no_marker(prepared_root, tmp_path,
                                                                                        monkeypatch, capsys):
    import shutil

    import yaml

    from histoshift.features import embedder, store as layout
    from histoshift.features.store import FeatureStore

    from helpers import FROZEN

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump(FROZEN))
    monkeypatch.setattr(layout, "CHUNK_ROWS", 16)
    real, written = embedder.write_chunk, []

    def killed_after_two(*a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(a[3])
        real(*a, **k)

    monkeypatch.setattr(embedder, "write_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(["--root", str(root), "embed", "--config", str(cfg)])
    monkeypatch.setattr(embedder, "write_chunk", real)
    store = _store(root)
    (store / "progress" / ".train-32.x1y2.tmp").write_text("partial")  # a marker's write a crash interrupted
    capsys.readouterr()
    assert main(["--root", str(root), "embed", "--config", str(cfg)]) == 0
    assert "resuming train at row 32 (32 of" in capsys.readouterr().out
    stamp = FeatureStore(store).stamp()
    (store / "progress" / ".val-0.a.tmp").write_text("x")
    assert FeatureStore(store).stamp() == stamp
