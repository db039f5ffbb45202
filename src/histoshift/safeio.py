"""Writes that cannot leave half a file, free-space checks, and locks between processes.

- `atomic(path)`: yields a temporary name beside `path`; renamed over it only when the block ends
  without an error, removed otherwise. Every artefact a stage writes goes through it.
- `require_free(folder, nbytes, what)`: one clear line (`DiskError`) instead of a SIGBUS or a
  half-written file when the disk cannot hold what a stage is about to write.
- `Lock(path, what)`: an advisory `flock` held while a stage works on a folder; a second process
  is refused at once with the holder's pid and start time. The kernel releases it when the holder
  dies (kill -9 included), so a crash never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path


class DiskError(RuntimeError):
    """Not enough free space for a write that is about to start (or that failed for want of it)."""


class LockError(RuntimeError):
    """Another process holds the lock of a run folder or a stage."""


@contextmanager
def atomic(path: Path):
    """A temporary path beside `path` (same folder, so the final rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _cleanup(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskError(f"disk full while writing {path} (nothing was replaced)") from None
        raise
    except BaseException:
        _cleanup(tmp)
        raise


def _cleanup(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, table, **kwargs) -> None:
    kwargs.setdefault("index", False)
    with atomic(path) as tmp:
        table.to_csv(tmp, **kwargs)


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def require_free(folder: Path, nbytes: int, what: str) -> None:
    """Refuse (DiskError) unless the disk holding `folder` has room for `nbytes` more (+ 1% and 64 MB)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.01) + (64 << 20)
    if free < need:
        raise DiskError(f"{folder}: {what} needs {human(need)} free, the disk has {human(free)}; "
                        "free some space (nothing was changed)")


def reserve_npy(path: Path, shape: tuple, dtype, what: str):
    """A new .npy memory map (mode w+) whose blocks are allocated now: a full disk fails here with one
    line, not later with SIGBUS inside a write to a sparse file."""
    import numpy as np

    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as e:
        Path(path).unlink(missing_ok=True)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raise DiskError(f"{path}: cannot reserve {human(nbytes)} for {what} ({e.strerror}); free some space") from None
    finally:
        os.close(fd)
    return arr


class Lock:
    """`with Lock(path, "the run work/runs/x/seed0/fold0"):` - exclusive, refused at once when held."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def __enter__(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(f"{self.what} is in use by another process ({holder}); wait for it to finish or stop it "
                            f"(lock file {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
