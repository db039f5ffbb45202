"""One module per CLI stage, named as the stage (`stain-gan` -> stain_gan.py), in pipeline order.

Each module holds its `STAGE` (what it does, reads and writes: the text of `--help`), `arguments(parser)` and
`run(args, paths)` (an exit status, or None for 0), and the stage's own orchestration. Nothing in the package
imports a stage; the CLI (cli.py) loops over them. The CLI imports every stage module to build its help, so a
stage module's top level imports nothing heavy: the work's imports sit in the functions that do it (torch,
timm and the rest cost seconds; `histoshift folds` or `--help` should not pay them).
"""
from __future__ import annotations

import argparse
import textwrap
import time
from dataclasses import dataclass

ORDER = (
    "demo_data",
    "prepare",
    "folds",
    "preflight",
    "stain_gan",
    "robustify",
    "embed",
    "train",
    "infer",
    "stack",
    "submit",
    "report",
    "score",
    "recipes",
    "fm_standin",
)


@dataclass(frozen=True)
class Stage:
    """A sub-command: what it does, what it reads and what it writes (shown by --help)."""
    help: str
    reads: str
    writes: str
    flow: str = ""  # the short form for the top-level help: what it takes -> what it makes

    def description(self) -> str:
        wrap = lambda label, text: textwrap.fill(text, 100, initial_indent=label, subsequent_indent=" " * len(label))  # noqa: E731
        return f"{self.help}.\n\n{wrap('reads:  ', self.reads)}\n{wrap('writes: ', self.writes)}"


def command(module: str) -> str:
    """The stage's name on the command line: the module's, '-' for '_'."""
    return module.replace("_", "-")


def timed(name: str, fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    print(f"[{name}] finished in {time.time() - t0:.1f} s", flush=True)
    return out


def seed(text: str) -> int:
    """A seed option: a non-negative integer (numpy's generators refuse others with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def experiment(a):
    """The config of --config with its overrides (and --seed, --pseudo), checked against the registries."""
    from ..config import ConfigError
    from ..models.foundation.checked import load_experiment  # no torch: a stage with nothing to do is quick

    overrides = list(a.overrides) + ([f"train.seed={a.seed}"] if getattr(a, "seed", None) is not None else [])
    if getattr(a, "pseudo", None) is not None:  # the second round: its own run names, so the first round's runs stay
        if not 0.5 < a.pseudo < 1:
            raise ConfigError(f"--pseudo: expected a confidence threshold in (0.5, 1), got {a.pseudo}")
        overrides += [f"name={load_experiment(a.config, overrides).name}_pl", f"train.pseudo_threshold={a.pseudo}"]
    return load_experiment(a.config, overrides)


def config_arguments(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", required=True, help="one experiment's YAML file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help=f"typed overrides, e.g. {example}")
