"""Rows of a feature store read from disk a batch or a chunk at a time: what training, prediction and every
statistic read, so that memory is bounded by a chunk, never by the store (the competition's stores are 5-11 GB).

Written by hand, not np.memmap: a memory map puts every page it touches into the process's resident memory, and
one epoch of random batches touches the whole split (RSS grows to the store's size). `os.pread` copies only the
rows asked for, from the page cache, into a fresh buffer; rows that follow each other are read in one call.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Iterator

import numpy as np
import pandas as pd
import torch

CHUNK_BYTES = 8 << 20  # bytes of stored rows per chunk of a sequential pass (statistics: 4x that in float64)


def _numpy(index) -> np.ndarray:
    return index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)


class NpyRows:
    """The rows of one .npy array file (N x V x D, C order) read with pread: `read(rows, views)`."""

    def __init__(self, path, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, int(offset), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def raw(self, start: int, stop: int) -> bytes:
        """The stored bytes of rows start..stop-1 (a chunk's checksum hashes exactly these)."""
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            self._pread_into(f.fileno(), start, out)
        return out.data.cast("B")

    def _pread_into(self, fd: int, first: int, out: np.ndarray) -> None:
        """Rows first.. into `out` (C-contiguous, whole rows), straight from the file: no intermediate buffer."""
        view, at = memoryview(out).cast("B"), self.offset + first * self.row_bytes
        while len(view):
            got = os.preadv(fd, [view[:1 << 30]], at)
            if not got:
                raise EOFError(f"{self.path}: ends before row {first + len(out) - 1} (truncated)")
            view, at = view[got:], at + got

    def read_one(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """View views[i] of row rows[i] (n x D): one pread of D values each, in file order."""
        out = np.empty((len(rows),) + self.shape[2:], self.dtype)
        size = self.row_bytes // self.shape[1]
        at = self.offset + np.asarray(rows, np.int64) * self.row_bytes + np.asarray(views, np.int64) * size
        order = np.argsort(at, kind="stable")
        buffer = memoryview(out).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:  # the loop's body is one system call: Python's per-row work is what a batch costs here
            for i, offset in zip(order.tolist(), at[order].tolist()):
                if os.preadv(fd, [buffer[i * size:(i + 1) * size]], offset) != size:
                    raise EOFError(f"{self.path}: ends before row {rows[i]} (truncated)")
        finally:
            os.close(fd)
        return out

    def read(self, rows: np.ndarray, views: int | None = None) -> np.ndarray:
        """The first `views` views (all: None) of `rows` (any order, repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        v = views or self.shape[1]
        whole = np.empty((len(rows),) + self.shape[1:], self.dtype)  # whole rows, in sorted order
        if not len(rows):
            return whole[:, :v]
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(ordered) != 1) + 1, [len(rows)]])
        with open(self.path, "rb", buffering=0) as f:
            for a, b in zip(bounds[:-1], bounds[1:]):  # one read per run of consecutive rows
                self._pread_into(f.fileno(), int(ordered[a]), whole[a:b])
        if v == self.shape[1] and np.all(order[1:] > order[:-1]):
            return whole  # asked in increasing order: already in place
        out = np.empty((len(rows), v) + self.shape[2:], self.dtype)
        out[order] = whole[:, :v]
        return out


class TableRows:
    """A table's patches (any mix of splits) in a store: `rows[positions]` (positions in the table) for a
    training batch, `chunks()` for a sequential pass, `tensor()` for all of them (float16 as stored).

    `views`: the first V stored views (None: every view all the table's splits have). `standard`: center ->
    (mean, std) (D): rows come back standardised by their center's statistics, `((x - mean) / std)` in float32,
    stored as float16; `device`: where `chunks()` puts its chunks."""

    device = torch.device("cpu")  # where an index for `rows[...]` lives (TensorBatches moves it here)

    def __init__(self, store, table: pd.DataFrame, views: int | None = None,
                 standard: dict | None = None, chunk_device: torch.device | str = "cpu"):
        self.files = store.files
        splits = list(table["split"].unique())
        self.views = views or (min(self.files[s].shape[1] for s in splits) if splits else store.views)
        self.split_codes = table["split"].map({s: i for i, s in enumerate(splits)}).to_numpy()
        self.splits, self.rows = splits, table["row"].to_numpy(np.int64)
        self.centers = table["center"].to_numpy()
        self.standard, self.chunk_device = standard, torch.device(chunk_device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return next(iter(self.files.values())).shape[-1]

    def _read(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.views, self.dim), np.float16)
        codes = self.split_codes[positions]
        for k, split in enumerate(self.splits):
            mine = np.flatnonzero(codes == k)
            if len(mine):
                out[mine] = self.files[split].read(self.rows[positions[mine]], self.views)
        return out

    @property
    def shape(self) -> tuple:
        return (len(self), self.views, self.dim)

    def _read_one(self, positions: np.ndarray, views: np.ndarray) -> np.ndarray:
        if len(views) and (views.min() < 0 or views.max() >= self.views):
            raise IndexError(f"views {views.min()}..{views.max()} of {self.views}")
        out = np.empty((len(positions), self.dim), np.float16)
        codes = self.split_codes[positions]
        for k, split in enumerate(self.splits):
            mine = np.flatnonzero(codes == k)
            if len(mine):
                out[mine] = self.files[split].read_one(self.rows[positions[mine]], views[mine])
        return out

    def __getitem__(self, key) -> torch.Tensor:
        """rows[positions] (n x V x D, float16) or rows[positions, views] (n x D float32: view views[i] of each
        row, a training batch)."""
        positions, views = key if isinstance(key, tuple) else (key, None)
        positions = _numpy(positions).astype(np.int64)
        if views is None:
            x = torch.from_numpy(self._read(positions))  # float16 as stored (passes, self-training)
        else:  # a training batch, float32 as the head takes it (numpy's float16 casts are 10x torch's)
            x = torch.from_numpy(self._read_one(positions, _numpy(views))).float()
        if self.standard is None:
            return x
        centers = self.centers[positions]
        if len(centers) and (centers == centers[0]).all():  # one center (a chunk of a pass): no gather
            mean, std = self._standard[centers[0]]
            return x.float().sub_(mean).div_(std).to(x.dtype)
        code = torch.from_numpy(np.searchsorted(self._centers, centers))
        means, stds = self._stacked
        shape = (len(x),) + (1,) * (x.ndim - 2) + (-1,)  # a batch's row statistics, broadcast over its views
        return x.float().sub_(means[code].view(shape)).div_(stds[code].view(shape)).to(x.dtype)

    @cached_property
    def _standard(self) -> dict:
        """The centers' statistics in float32 on the CPU (a float16 result needs no more; float64 per batch
        tripled a training step's temporaries)."""
        return {c: (m.float().cpu(), s.float().cpu()) for c, (m, s) in self.standard.items()}

    @cached_property
    def _centers(self) -> np.ndarray:
        return np.array(sorted(self.standard))

    @cached_property
    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C x D means, C x D stds), rows in the order of `_centers`."""
        return tuple(torch.stack([self._standard[c][k] for c in self._centers]) for k in (0, 1))

    def chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // (self.views * self.dim * 2))

    def chunks(self) -> Iterator[torch.Tensor]:
        """The rows in table order, a chunk of CHUNK_BYTES at a time, on `chunk_device`."""
        step = self.chunk_rows()
        for i in range(0, len(self), step):
            yield self[np.arange(i, min(i + step, len(self)))].to(self.chunk_device)

    def tensor(self) -> torch.Tensor:
        """Every row at once (float16, n x V x D): for the few users that need the whole table (self-training)."""
        return self[np.arange(len(self))]
