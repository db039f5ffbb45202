"""The one base class of every refusal a user can meet: one line naming the file, id or key, exit status 2.

Each layer keeps its own subclass (ConfigError, InputError, StaleError, ...) so that tests and callers can
tell them apart; the CLI catches this one class (cli.py). `Missing` and `Exists` are the refusals that are
also the standard library's file errors (a stage that has not run yet, a result that would be replaced).
"""
from __future__ import annotations


class HistoshiftError(Exception):
    """A refusal: the message is the whole story (no traceback), the process exits with `exit_code`."""
    exit_code = 2


class Missing(HistoshiftError, FileNotFoundError):
    """A file a stage reads is missing or unusable: run the stage that writes it, or fix the file."""


class Exists(HistoshiftError, FileExistsError):
    """A file a user made would be replaced: the stage refuses unless told to (--force keeps the old one)."""


class NonFiniteError(HistoshiftError, ValueError):
    """A training loss became NaN or inf: the run stops, nothing is marked done (the engine's rule, and the
    stain GAN's)."""


def require_finite(values, message: str) -> None:
    """Raise NonFiniteError(message) unless every value is a finite number."""
    import math

    if not all(math.isfinite(float(v)) for v in values):
        raise NonFiniteError(message)
