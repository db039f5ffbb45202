"""The feature store's lock between processes: readers share it, an embed, repair or rebuild holds it alone.

A head trains for minutes on a store that took an hour to embed; another process re-embedding the same store
under it (a hub update under the same revision, a damaged split repaired) would leave it training on a mixture of
old and new features. So every process that reads a store holds a shared flock on <store>/.lock until it exits,
and the embed stage takes it exclusively for the check's clean-up and the embedding. Neither waits: the side that
comes second stops with one line naming the other. The kernel drops a dead process's lock (kill -9 included).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..safeio import LockError, open_nofollow


class StoreBusy(LockError):
    """Another process embeds the store (a reader is refused) or reads it (a rebuild is refused)."""


class StoreLock:
    """The store's flock (<store>/.lock), one per store and process: shared while a process reads the store (held
    until it exits or `release`), exclusive while one embeds, repairs or rebuilds it. Both are asked without
    waiting: a reader meets a rebuild, or a rebuild meets a reader, as one line naming the other side."""

    _HELD: dict[Path, "StoreLock"] = {}

    def __init__(self, path: Path):
        self.path, self.fd, self.mode = Path(path), None, None

    @classmethod
    def of(cls, path: Path) -> "StoreLock":
        path = Path(path).resolve()
        return cls._HELD.setdefault(path, cls(path))

    def _flock(self, mode: int) -> bool:
        if self.fd is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fd = open_nofollow(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def shared(self) -> None:
        if self.mode == "shared":
            return
        if not self._flock(fcntl.LOCK_SH):
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise StoreBusy(f"{self.path}: the feature store is being embedded or rebuilt by {holder}; nothing is "
                            "trained on a store being written: wait for it to finish, then run again")
        self.mode = "shared"

    def exclusive(self) -> None:
        if self.mode == "exclusive":
            return
        if not self._flock(fcntl.LOCK_EX):
            if self.mode is None and self._flock(fcntl.LOCK_SH):  # only readers hold it
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                raise StoreBusy(f"{self.path}: the feature store is read by another process (a head training or "
                                "predicting on it); it is not embedded or repaired under a reader: wait for that "
                                "process to finish, then run again")
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise StoreBusy(f"{self.path}: the feature store is being embedded by {holder} (configs on one backbone "
                            "share it: it is embedded once); wait for it to finish, then run again")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"embed, pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.mode = "exclusive"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.mode = None

    def close(self) -> None:
        """Unlocked and forgotten: the store's folder is being removed (a first attempt that failed)."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.mode = None, None
        StoreLock._HELD.pop(self.path, None)
