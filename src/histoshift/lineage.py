"""What each stage was computed from, so that nothing stale is reused in silence.

The chain, and where each link is recorded:
  input/*.h5      -> work/cache/manifest.json   the files' size and mtime; per split a digest of the
                                                 cached images, ids, labels and centers; the cache id
  cache           -> folds/folds.csv            compared with the folds of the current index (folds stage)
                                                 and checked against it before training (no leak)
  cache + folds   -> run/inputs.json            the split digests, the folds file's digest, a head's
                     (+ stack/test_features.csv  feature store and a pseudo-label round's source)
                      for pseudo-labels)
  run checkpoint  -> run/predictions.json       per TTA file: the checkpoint's and the cache's digests
  runs' TTA files -> the stack's choice          the cache id, the folds digest, every member's checkpoint
  stack           -> submit                     refuses test scores of another cache or of a changed test.h5
A stage that meets a stale input recomputes it when that is cheap and safe (TTA predictions) and
otherwise refuses with one line saying what changed (`StaleError`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import HistoshiftError

_MEMO: dict[tuple, str] = {}


class StaleError(HistoshiftError, ValueError):
    """An input of this stage was computed from something that has changed since."""


def digest_file(path: Path) -> str:
    """A content digest of one file (blake2b-128), memoised per (path, size, mtime) within a process."""
    path = Path(path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def changed(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two lineage records."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    if f"{prefix}features" in out:  # another store: its content (per split) follows
        out = [k for k in out if not k.startswith(f"{prefix}features_content")]
    return out
