"""`submit --kaggle SLUG`: the checked submission uploaded through Kaggle's official client, with a message
that says what it was made from (the stack's lineage). Without the option nothing is ever uploaded.

The client is the `kaggle` package (`pip install -e '.[kaggle]'`, in requirements.txt), the same code as
`kaggle competitions submit -c SLUG -f FILE -m MESSAGE`; its credentials are the client's own (the
KAGGLE_API_TOKEN variable or ~/.kaggle/access_token, or the legacy KAGGLE_USERNAME/KAGGLE_KEY or
~/.kaggle/kaggle.json). Each failure is one line (`UploadError`, exit 2): the client not installed, no
credentials, the upload refused. The submit stage connects before it writes anything and places the local
submission only after Kaggle accepted it, so a failure leaves submissions/ as it was.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from .errors import HistoshiftError

SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")
MESSAGE_LIMIT = 500  # characters: Kaggle's submission description is short


class UploadError(HistoshiftError, ValueError):
    """The upload could not happen or was refused (one line)."""


def check_slug(slug: str) -> str:
    if not SLUG.fullmatch(slug):
        raise UploadError(f"--kaggle {slug!r}: a competition slug is lower-case letters, digits and '-' "
                          "(the last part of its URL, kaggle.com/competitions/<slug>)")
    return slug


def lineage_message(choice) -> str:
    """What the submission was made from, from the stack's choice (a stack.folder.StackChoice): the members (config x
    seeds, folds), the combiner and its leave-one-center-out accuracy, the prediction set and the rule that chose it,
    the cache id."""
    configs = "; ".join(f"{name} seeds {','.join(map(str, e['seeds']))} x {len(e['folds'])} folds"
                        for name, e in choice.ensemble.items())
    method = choice.method
    loco = choice.loco_accuracy.get(method)
    parts = [f"histoshift: {configs}" if configs else "histoshift",
             f"combiner {method}" + (f" (LOCO acc {loco:.4f})" if isinstance(loco, (int, float)) else ""),
             f"set {_set(choice)} by rule {choice.rule}" + _evidence(choice),
             f"cache {choice.cache_id or '?'}"]
    text = " | ".join(parts)
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 3] + "..."


def _set(choice) -> str:
    """The chosen prediction set in words: plain, a Fourier set, or the adapted set named by its adaptations (AdaBN
    for fine-tuned backbones, a feature shift or self-training for heads), alone or beside the plain one."""
    pset = choice.shipped.pset
    if not pset.adapted:
        return pset.name
    how = ", ".join(choice.adaptation_methods())
    return f"{'plain and adapted' if pset.kind == 'both' else 'adapted'} ({how})"


def _evidence(choice) -> str:
    """The paired plain-vs-adapted evidence the rules weigh, short: ' (plain-adapted LOCO -0.4 pts, CI -1.0..+0.2)'."""
    p = (choice.adapted_vs_plain or {}).get("paired")
    return (f" (plain-adapted LOCO {100 * p['diff']:+.1f} pts, CI {100 * p['lo']:+.1f}..{100 * p['hi']:+.1f})"
            if p else "")


def connect():
    """The authenticated client API, or UploadError. The client prints its own instructions on import and on
    failure; they are captured (our one line says what to do)."""
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as e:
        raise UploadError(f"submit --kaggle: the Kaggle client is not installed ({e}); pip install kaggle "
                          "(or pip install -e '.[kaggle]'); nothing was written or uploaded") from None
    api = KaggleApi()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            api.authenticate()
    except SystemExit:  # what the client does without credentials
        raise UploadError("submit --kaggle: no Kaggle credentials (set KAGGLE_API_TOKEN or save the token from "
                          "kaggle.com/settings to ~/.kaggle/access_token; legacy: KAGGLE_USERNAME and KAGGLE_KEY or "
                          "~/.kaggle/kaggle.json); nothing was written or uploaded") from None
    except Exception as e:  # a token is checked online: refused, or Kaggle out of reach
        raise UploadError(f"submit --kaggle: Kaggle did not accept the credentials or could not be reached "
                          f"({_first_line(e)}); nothing was written or uploaded") from None
    return api


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def upload(api, path: Path, slug: str, message: str) -> str:
    """Upload one file; returns the client's answer, or UploadError when Kaggle refused it."""
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            response = api.competition_submit(str(path), message, slug, quiet=True)
    except (Exception, SystemExit) as e:
        raise UploadError(f"submit --kaggle {slug}: the upload failed or was refused ({_first_line(e)}); the local "
                          "submission is unchanged") from None
    answer = str(getattr(response, "message", "") or "")
    if answer == getattr(api, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", None):
        printed = " ".join(noise.getvalue().split())[:200]
        raise UploadError(f"submit --kaggle {slug}: the upload failed or was refused ({answer}"
                          f"{': ' + printed if printed else ''}); the local submission is unchanged")
    return answer or "submitted"
