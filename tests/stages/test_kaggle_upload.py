"""submit --kaggle SLUG: uploads through the official client with a message built from the lineage; without the
client, without credentials or when the upload fails, one line, exit 2, and submissions/ exactly as it was."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from histoshift.cli import main
from histoshift.kaggle_upload import lineage_message
from histoshift.stack.folder import StackDir
from histoshift.stack.sets import ADAPTED, BOTH, PLAIN, Label

pytestmark = pytest.mark.slow  # the `finished` root trains heads


def _flip(root) -> None:
    """Other predictions in the stack's test scores: a submission that would replace the current one."""
    scores = root / "work" / "stack" / "test_scores.csv"
    table = pd.read_csv(scores)
    table["pred"] = 1 - table["pred"]
    table.to_csv(scores, index=False)


def _state(folder) -> dict:
    """Every submission file, its bytes and time (the stage's own .lock aside)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


def _cli(root, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histoshift", "--root", str(root), "submit", "--allow-degenerate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home)}


def test_the_message_says_what_the_submission_was_made_from(finished):
    import json

    choice = json.loads((finished / "work" / "stack" / "choice.json").read_text())
    text = lineage_message(StackDir(finished / "work" / "stack").require_choice("stack"))
    shipped = Label.from_record(choice["shipped"])  # the typed record, rendered by the message only
    assert choice["ensemble"] == {"head": {"seeds": [0], "folds": [0, 1, 3, 4]}}
    assert "head seeds 0 x 4 folds" in text and f"combiner {shipped}" in text
    assert f"LOCO acc {choice['loco_accuracy'][str(shipped)]:.4f}" in text and choice["lineage"]["cache"] in text
    words = "plain" if shipped.pset == PLAIN else "adapted (" if shipped.pset == ADAPTED else "plain and adapted ("
    assert f"set {words}" in text and f"by rule {choice['rule']}" in text  # set and rule named
    assert len(text) <= 500


def test_without_the_client_nothing_is_written_or_uploaded(finished, monkeypatch, capsys):
    _flip(finished)
    before = _state(finished / "submissions")
    for name in ("kaggle", "kaggle.api", "kaggle.api.kaggle_api_extended"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, as when it is not installed
    assert main(["--root", str(finished), "submit", "--allow-degenerate", "--kaggle", "some-competition"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Kaggle client is not installed" in err[0] and "pip install kaggle" in err[0]
    assert _state(finished / "submissions") == before


def test_without_credentials_or_when_the_upload_fails_nothing_changes_locally(finished, tmp_path):
    _flip(finished)
    before = _state(finished / "submissions")
    env = _clean_env(tmp_path)
    proc = _cli(finished, env, "--kaggle", "some-competition")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no Kaggle credentials" in lines[0], proc.stdout + proc.stderr
    assert _state(finished / "submissions") == before
    # credentials the client takes without asking Kaggle; the upload itself cannot reach it (no network in tests;
    # with a network Kaggle would refuse them): one line, the local submission unchanged
    proc = _cli(finished, {**env, "KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0" * 32}, "--kaggle", "some-competition")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "upload failed or was refused" in lines[0], proc.stderr
    assert _state(finished / "submissions") == before
    assert not list((finished / "work" / "stack").glob(".upload-*"))  # the temporary copy is gone
    proc = _cli(finished, env, "--kaggle", "Not A Slug")
    assert proc.returncode == 2 and "competition slug" in proc.stderr


def test_an_accepted_upload_sends_the_checked_file_and_then_places_it(finished, monkeypatch, capsys):
    """Kaggle's side replaced (no network in tests): the client's own authenticate and competition_submit are
    patched on its class, so everything of ours and of the client's import runs."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    sent = {}

    def submit(self, file_name, message, competition, quiet=False, sandbox=False):
        sent.update(csv=pd.read_csv(file_name), message=message, competition=competition)
        return type("Response", (), {"message": "Successfully submitted to Some Competition"})()

    monkeypatch.setattr(KaggleApi, "authenticate", lambda self: None)
    monkeypatch.setattr(KaggleApi, "competition_submit", submit)
    _flip(finished)
    assert main(["--root", str(finished), "submit", "--allow-degenerate", "--kaggle", "some-competition"]) == 0
    out = capsys.readouterr().out
    assert "uploaded to kaggle.com/competitions/some-competition (Successfully submitted" in out
    local = pd.read_csv(finished / "submissions" / "submission.csv")
    assert sent["competition"] == "some-competition" and sent["csv"].equals(local)
    assert sent["message"] == lineage_message(StackDir(finished / "work" / "stack").require_choice("stack"))
    # a refusal the client reports in its answer, not by raising: one line, nothing placed
    monkeypatch.setattr(
        KaggleApi,
        "competition_submit",
        lambda self, *a, **k: type("R", (), {"message": KaggleApi.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE})(),
    )
    _flip(finished)
    before = _state(finished / "submissions")
    assert main(["--root", str(finished), "submit", "--allow-degenerate", "--kaggle", "some-competition"]) == 2
    assert "upload failed or was refused (Could not submit" in capsys.readouterr().err
    assert _state(finished / "submissions") == before


def test_the_message_names_the_adaptation_not_always_adabn():
    # the adapted set is named by what adapted it (a head's feature shift or self-training, AdaBN for fine-tuned
    # backbones), from the stack's record of every fold model's adaptation
    from histoshift.stack.folder import StackChoice

    head = {"method": "feature shift (standardize)", "changed": 1}
    base = dict(members=["h/seed0"], loco_accuracy={"mean+adapt": 0.9}, rule="margin",
                ensemble={"h": {"seeds": [0, 2], "folds": [0, 1, 3, 4]}})
    adapted = StackChoice(**base, shipped=Label("mean", ADAPTED), adaptations={"h/seed0/fold0": head})
    text = lineage_message(adapted)
    assert "set adapted (feature shift (standardize)) by rule margin" in text
    assert "h seeds 0,2 x 4 folds" in text and "combiner mean+adapt (LOCO acc 0.9000)" in text
    both = StackChoice(**base, shipped=Label("mean", BOTH),
                       adaptations={"h/seed0/fold0": None, "h/seed0/fold1": {"method": "AdaBN", "changed": 9}})
    assert "set plain and adapted (AdaBN) by rule margin" in lineage_message(both)
    older = StackChoice(**base, shipped=Label("mean", ADAPTED))  # written before adaptations were recorded
    assert "set adapted (AdaBN) by rule margin" in lineage_message(older)
    plain = StackChoice(**base, shipped=Label("mean", PLAIN, prior=True))
    assert "set plain by rule margin" in lineage_message(plain) and "combiner mean@prior" in lineage_message(plain)
