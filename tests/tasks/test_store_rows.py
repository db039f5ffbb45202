"""The feature path reads the store a batch or a chunk at a time (features/rows.py): the same values as the
whole arrays, and memory bounded by a chunk, not by the store."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from histoshift.features import rows as rows_module
from histoshift.features.rows import NpyRows, TableRows
from histoshift.models.feature_shift import covariance, moments


class _Store:
    """Two splits written as .npy files (the layout a FeatureStore reads)."""

    def __init__(self, tmp_path, shapes):
        self.arrays, self.views = {}, 3
        for split, shape in shapes.items():
            a = np.random.default_rng(len(split)).standard_normal(shape).astype(np.float16)
            np.save(tmp_path / f"{split}.npy", a)
            self.arrays[split] = a
        self.files = {s: _rows(tmp_path / f"{s}.npy") for s in shapes}


def _rows(path) -> NpyRows:
    m = np.load(path, mmap_mode="r")
    return NpyRows(m.filename, m.offset, m.shape, m.dtype)


def test_rows_in_any_order_with_repeats_and_fewer_views_are_the_arrays_rows(tmp_path):
    store = _Store(tmp_path, {"train": (50, 5, 7)})
    rows = np.array([3, 4, 5, 49, 0, 4, 4, 17, 18, 2])
    np.testing.assert_array_equal(store.files["train"].read(rows), store.arrays["train"][rows])
    np.testing.assert_array_equal(store.files["train"].read(rows, 2), store.arrays["train"][rows, :2])
    assert store.files["train"].read(np.array([], int)).shape == (0, 5, 7)
    assert store.files["train"].raw(10, 20) == store.arrays["train"][10:20].tobytes()
    views = np.array([0, 4, 2, 1, 3, 3, 0, 4, 2, 1])
    np.testing.assert_array_equal(store.files["train"].read_one(rows, views), store.arrays["train"][rows, views])


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    store = _Store(tmp_path, {"train": (50, 5, 7)})
    path = tmp_path / "train.npy"
    rows = store.files["train"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(EOFError, match="train.npy: ends before row 49"):
        rows.read(np.array([48, 49]))


def test_table_rows_mix_splits_standardise_per_center_and_chunk_like_the_whole(tmp_path, monkeypatch):
    store = _Store(tmp_path, {"train": (40, 5, 6), "test": (30, 3, 6)})
    table = pd.DataFrame({"split": ["test"] * 10 + ["train"] * 20, "row": list(range(29, 19, -1)) + list(range(20)),
                          "center": [2] * 10 + [0] * 10 + [3] * 10})
    whole = np.concatenate([store.arrays["test"][29:19:-1], store.arrays["train"][:20, :3]])
    rows = TableRows(store, table)
    assert rows.views == 3 and len(rows) == 30
    np.testing.assert_array_equal(rows.tensor().numpy(), whole)
    standard = {c: moments(torch.from_numpy(whole[table["center"].to_numpy() == c])) for c in (0, 2, 3)}
    scaled = TableRows(store, table, standard=standard).tensor()
    for c in (0, 2, 3):
        mean, std = moments(scaled[torch.from_numpy(table["center"].to_numpy() == c)])
        assert torch.allclose(mean, torch.zeros_like(mean), atol=2e-3) and torch.allclose(
            std, torch.ones_like(std), atol=2e-3
        )
    batch = torch.tensor([29, 0, 15, 15])
    torch.testing.assert_close(TableRows(store, table, standard=standard)[batch], scaled[batch], rtol=0, atol=0)
    views = torch.tensor([2, 0, 1, 2])  # one view of each row (training batches), standardised alike
    one = TableRows(store, table, standard=standard)[batch, views]
    assert one.dtype == torch.float32 and torch.equal(one.half(), scaled[batch, views])
    assert rows.shape == (30, 3, 6)
    with pytest.raises(IndexError):
        rows[batch, torch.tensor([0, 0, 3, 0])]  # the train rows have 5 views, the table uses 3
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 3 * 6 * 2 * 7)  # 7 rows a chunk: 5 chunks
    assert rows.chunk_rows() == 7 and [len(c) for c in rows.chunks()] == [7, 7, 7, 7, 2]
    for a, b in zip(moments(rows), moments(torch.from_numpy(whole))):
        torch.testing.assert_close(a, b)
    for a, b in zip(covariance([TableRows(store, table.iloc[:12]), TableRows(store, table.iloc[12:], 3)]),
                    covariance(torch.from_numpy(whole))):
        torch.testing.assert_close(a, b)


@pytest.mark.slow  # a child process
def test_a_pass_over_the_store_holds_a_chunk_not_the_store(tmp_path):
    """A 128 MB split read in full (statistics and random batches) by a fresh process: its peak resident memory
    grows by far less than the split (a memory map would have mapped every page it touched)."""
    n, v, d = 8192, 8, 1024  # 8192 x 8 x 1024 float16 = 128 MiB
    arr = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float16, shape=(n, v, d))
    for i in range(0, n, 2048):
        arr[i:i + 2048] = np.random.default_rng(i).standard_normal((2048, v, d), np.float32).astype(np.float16)
    arr.flush()
    del arr
    script = textwrap.dedent(f"""
        import resource, numpy as np, pandas as pd, torch
        from histoshift.features import rows as layout
        from histoshift.features.rows import NpyRows, TableRows
        layout.CHUNK_BYTES = 2 << 20  # 2 MB chunks (8 MB float64 temporaries)
        from histoshift.models.feature_shift import moments
        m = np.load({str(tmp_path / 'train.npy')!r}, mmap_mode="r")
        class S: files = {{"train": NpyRows(m.filename, m.offset, m.shape, m.dtype)}}; views = 8
        table = pd.DataFrame({{"split": "train", "row": np.arange({n}), "center": 0}})
        rows = TableRows(S, table)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mean, std = moments(rows)
        perm = torch.randperm({n})
        for i in range(0, {n}, 256):
            rows[perm[i:i + 256]]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown // 1024, float(mean.abs().max()), float(std.mean()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grown_mb, mean, std = int(out[0]), float(out[1]), float(out[2])
    assert abs(std - 1) < 0.01 and mean < 0.03  # the pass read the real rows
    assert grown_mb < 48, f"peak RSS grew by {grown_mb} MB reading a 128 MB split (a memory map: about 135)"
