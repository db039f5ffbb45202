"""One entry point, one sub-command per stage: python -m histoshift [--root DIR] <stage> ...

Every stage reads and writes under one root folder (the repository by default); `input/` is yours
and never written. Every stage is idempotent: run again with unchanged inputs, it does nothing it
has done before; a changed input makes the stages after it recompute or refuse with one line.
`<stage> --help` says exactly what a stage reads and writes; the stages are the modules of stages/.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from .errors import HistoshiftError
from .paths import Paths
from .stages import ORDER, command


def _stages() -> dict:
    return {command(name): importlib.import_module(f".stages.{name}", __package__) for name in ORDER}


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    stages = _stages()
    width = max(map(len, stages))
    epilog = ("what each stage reads -> writes (paths under --root; `<stage> --help` names the files):\n"
              + "\n".join(f"  {name:<{width}}  {m.STAGE.flow}" for name, m in stages.items()))
    p = argparse.ArgumentParser(prog="histoshift", description=__doc__, epilog=epilog, formatter_class=raw)
    p.add_argument("--root", default=".", help="folder holding input/, folds/, work/, submissions/")
    sub = p.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, module in stages.items():
        s = sub.add_parser(name, help=module.STAGE.help, description=module.STAGE.description(), formatter_class=raw)
        module.arguments(s)
        s.set_defaults(fn=module.run)
    return p


def _os_error_line(e: OSError) -> str | None:
    """A one-line message for the OS errors a user can cause (full disk, read-only or forbidden folder)."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return f"{where}: {e.strerror}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: disk full ({e.strerror}); free some space and run the stage again (it resumes)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror}; this stage needs to write there (check the folder's permissions)"
    return None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if Path(a.root).exists() and not Path(a.root).is_dir():
        print(f"error: --root {a.root}: is a file, not a folder (the root holds input/, work/, folds/, submissions/)",
              file=sys.stderr)
        return 2
    try:
        code = a.fn(a, Paths(Path(a.root)))
    except HistoshiftError as e:  # every refusal: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        line = _os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # a stage returns an exit status (preflight) or nothing


def cpu_allocator_defaults() -> None:
    """Before torch is imported (its CPU allocator reads this once): tensors of 2 MB and more on transparent huge
    pages where the kernel offers them on request (`madvise`, the common default). Without it every large
    activation freed and allocated again is faulted in 4 KB at a time: the demo's `infer --adapt` took 14.1 M page
    faults and 58 s on 2 cores, with it 1.0 M and 47 s. A value the user set wins (THP_MEM_ALLOC_ENABLE=0)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def entry() -> int:
    """The command's entry point (`histoshift`, `python -m histoshift`): the allocator's setting, main(), then the
    objects alive at exit frozen out of the garbage collector, so that the interpreter's teardown does not walk
    torch's and timm's (1.3 of a stage process's 5.7 s after those imports, measured on 2 cores). Not in main():
    tests call it in-process many times, and frozen objects are never collected."""
    import gc

    cpu_allocator_defaults()
    code = main()
    gc.freeze()
    return code
