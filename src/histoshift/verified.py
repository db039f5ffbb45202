"""What was verified, so that nothing is hashed twice: a record of files whose full content was checked.

`Record(<root>/work/verified.json)` maps a file (its resolved path) to what it was when its bytes were last read in
full - size, inode, device, modification and change time - and the digest (or verdict) that read gave. A later
stage, in this process or another, asks `known(path)`: the recorded digest when a `stat` shows the same file
(nothing to read), None otherwise. The change time (ctime) is the part no tool can set back: any write, chmod,
rename-over or copy moves it or gives a new inode, so a file that may have changed is always read again, once,
and recorded at its new state (a `cp -a` of a root costs one read per input, not one per stage and run).

What uses it: the cache's input files (data/cache.py: their digest against the manifest), the feature store's
split files (features/store.py: a split whose chunks all matched their checksums), content-addressed hub blobs
(models/foundation/hub.py: the blob hashes to its name).

The record is a cache of work done, never a source of truth: an unreadable or damaged record is treated as empty
(the files are read again), and a write that races another process's (each holds a blocking flock on
verified.json.lock for the read-modify-write) loses nothing. Written by hand: no library keeps a stat-keyed digest
cache across processes (git's index is the model: it trusts a file whose stat data did not change).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .safeio import write_json

VERIFIED = "verified.json"


def identity(path: Path) -> list[int]:
    """What a stat says about a file: size, inode, device, mtime and ctime (nanoseconds)."""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


class Record:
    """The verification record of one root (`<root>/work/verified.json`)."""

    def __init__(self, file: Path):
        self.file = Path(file)

    def _load(self) -> dict:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or damaged: everything is verified again
        return data if isinstance(data, dict) else {}

    def known(self, path: Path, what: str = "digest") -> str | None:
        """The recorded `what` of `path` when a stat shows it unchanged since it was verified; else None."""
        entry = self._load().get(f"{what}:{Path(path).resolve()}")
        try:
            return entry["value"] if entry and entry["stat"] == identity(path) else None
        except (OSError, KeyError, TypeError):
            return None

    def remember(self, path: Path, value: str, what: str = "digest", stat: list[int] | None = None) -> None:
        """Record `value` for `path` as a stat shows it now (or `stat`: taken before the bytes were read, so a
        write during the read leaves a record that no longer matches). Entries of files gone are dropped."""
        stat = identity(path) if stat is None else stat
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.file.with_name(self.file.name + ".lock")):
            data = self._load()
            data[f"{what}:{Path(path).resolve()}"] = {"stat": stat, "value": value}
            data = {k: v for k, v in data.items() if Path(k.partition(":")[2]).exists()}
            write_json(self.file, data)

    def digest(self, path: Path, compute: Callable[[Path], str], what: str = "digest") -> str:
        """`compute(path)` unless a stat shows the file as it was when it was last computed (then the recorded
        value): the one way a file's content is hashed once across stages and processes."""
        value = self.known(path, what)
        if value is None:
            stat = identity(path)
            value = compute(path)
            self.remember(path, value, what, stat)
        return value


@contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: held for one small read-modify-write
        yield
    finally:
        os.close(fd)
