"""Progress bars for long work: shown by the main process only, and off when TQDM_DISABLE is set
(tqdm reads that variable only for bars created without an explicit `disable`, which ours need)."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar(*args, main: bool = True, **kwargs) -> tqdm:
    off = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")
    return tqdm(*args, disable=off or not main, **kwargs)
