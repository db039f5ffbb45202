"""Writes that cannot leave half a file, free-space checks, and locks between processes.

- `atomic(path)`: yields a temporary file beside `path`, created exclusively under a random name (a symlink
  planted at a predictable name is never followed); renamed over `path` only when the block ends without
  an error (the rename replaces a symlink at `path`, never its target), removed otherwise. Every artefact a
  stage writes goes through it (`write_text`, `write_json`, `write_csv`, `write_figure`).
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
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import HistoshiftError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files get the permissions a plain open() would have given


class DiskError(HistoshiftError, RuntimeError):
    """Not enough free space for a write that is about to start (or that failed for want of it)."""


class LockError(HistoshiftError, RuntimeError):
    """Another process holds the lock of a run folder or a stage."""


@contextmanager
def atomic(path: Path):
    """A temporary path beside `path` (same folder, so the final rename is atomic)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL: never follows
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK, follow_symlinks=False)  # some writers (safetensors) recreate the file 0600
        os.replace(tmp, path)
    except OSError as e:
        _cleanup(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskError(f"disk full while writing {path} ({e.strerror}; nothing was replaced)") from None
        raise
    except BaseException:
        _cleanup(tmp)
        raise


def _cleanup(tmp: Path) -> None:
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


def write_figure(fig, path: Path, **kwargs) -> None:
    """A matplotlib figure, atomically (its format from the suffix)."""
    path = Path(path)
    with atomic(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs)


class LinkError(HistoshiftError, OSError):
    """A path histoshift would write through is a symbolic link (planted, or left by another tool)."""


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open that never follows a symbolic link at `path` (O_NOFOLLOW: checked and opened in one call)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode & ~_UMASK)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise LinkError(f"{path}: is a symbolic link; nothing is written through one (remove the link)") from None


def append_text(path: Path, text: str) -> None:
    """Append to a log file (metrics.jsonl), never through a symbolic link."""
    fd = open_nofollow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(text)


def open_npy(path: Path, mode: str = "r+"):
    """An existing .npy file as a memory map, opened without following a symbolic link (numpy opens by name:
    a link planted between a check and its open would be followed). ValueError: not a .npy array file."""
    import numpy as np

    fd = open_nofollow(Path(path), os.O_RDWR if mode == "r+" else os.O_RDONLY)
    with os.fdopen(fd, "r+b" if mode == "r+" else "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("holds Python objects, not numbers")
        return np.memmap(f, dtype=dtype, mode=mode, offset=f.tell(), shape=shape, order="F" if fortran else "C")


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def require_free(folder: Path, nbytes: int, what: str, margin: int = 64 << 20) -> None:
    """Refuse (DiskError) unless the disk holding `folder` has room for `nbytes` more (+ 1% and `margin`)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.01) + margin
    if free < need:
        raise DiskError(f"{folder}: {what} needs {human(need)} free, the disk has {human(free)}; "
                        "free some space (nothing was changed)")


def reserve_npy(path: Path, shape: tuple, dtype, what: str):
    """A new .npy memory map (mode r+) whose blocks are allocated now: a full disk fails here with one line
    naming the file, not later with SIGBUS inside a write to a sparse file. The file is made under a fresh
    temporary name (O_EXCL: never through a link) and renamed over `path` (a rename replaces a link, it does
    not follow it)."""
    import numpy as np

    path = Path(path)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "r+b") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": tuple(shape)})
            f.flush()
            size = f.tell() + nbytes
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem without it: go on
                    raise
            os.ftruncate(f.fileno(), size)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskError(f"{path}: cannot reserve {human(nbytes)} for {what} ({e.strerror}); free some space") from None
    return open_npy(path, "r+")


class Lock:
    """`with Lock(path, "the run work/runs/x/seed0/fold0"):` - exclusive, refused at once when held."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def __enter__(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a symlink: the holder's pid would overwrite the link's target
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except LinkError:
            raise LockError(f"{self.path}: is a symbolic link; a lock file is never opened through one "
                            "(remove the link)") from None
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
