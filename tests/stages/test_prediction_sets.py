"""A prediction set and a stack candidate's label are typed values (stack/sets.py): rendered to text for file names and
tables only, never parsed back; run folders predicted before the adapted files were renamed still read; a choice.json
of the text era is refused in one line."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from histoshift.lineage import StaleError
from histoshift.runs import RunDir
from histoshift.stack.sets import ADAPTED, BOTH, PLAIN, Label, PredictionSet

SRC = Path(__file__).resolve().parents[2] / "src" / "histoshift"


def test_labels_render_from_their_fields():
    assert str(Label("mean")) == "mean" and str(Label("rank", ADAPTED)) == "rank+adapt"
    assert str(Label("stack", BOTH, prior=True)) == "stack+both@prior"
    assert str(Label("mean", PredictionSet.fourier(0.03, 3), prior=True)) == "mean+fourier-b0.03-n3@prior"
    assert Label("mean", ADAPTED).matched() == Label("mean", ADAPTED, prior=True)
    assert [s.name for s in (PLAIN, ADAPTED, BOTH, PredictionSet.fourier(0.1, 7))] == \
        ["plain", "adapt", "both", "fourier-b0.1-n7"]
    assert ADAPTED.adapted and BOTH.adapted and not PLAIN.adapted and not PredictionSet.fourier(0.01).adapted
    # ties go plain, adapted, both, then Fourier by beta and donors (numbers, not text: n10 after n3)
    sets = [PredictionSet.fourier(0.03, 10), PredictionSet.fourier(0.03, 3), PredictionSet.fourier(0.01, 7), BOTH,
            ADAPTED, PLAIN]
    assert sorted(sets, key=PredictionSet.order) == sets[::-1]


@pytest.mark.parametrize("make", [
    lambda: Label("median"),
    lambda: PredictionSet("adabn"),
    lambda: PredictionSet("fourier"),  # no beta
    lambda: PredictionSet("plain", donors=3),
    lambda: PredictionSet.fourier(-0.01),
    lambda: PredictionSet.fourier(0.03, 0),
])
def test_a_label_that_cannot_be_is_refused(make):
    with pytest.raises(ValueError, match="not a"):
        make()


def test_the_record_round_trips_through_json_and_refuses_anything_else():
    for label in (Label("mean"), Label("rank", BOTH, True), Label("stack", PredictionSet.fourier(0.05, 1))):
        assert Label.from_record(json.loads(json.dumps(label.record()))) == label
    for bad in ("mean+adabn", {"combiner": "mean"}, {"combiner": "mean", "pset": {"kind": "x"}, "prior": False},
                {"combiner": "mean", "pset": {"kind": "plain"}, "prior": "yes"}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            Label.from_record(bad)


def _literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_module_but_sets_builds_or_takes_apart_a_labels_text():
    """The label's pieces as text ('@prior', '+adapt', '+both', '+fourier', the older '+adabn') appear in code only in
    stack/sets.py: everything else asks the typed fields (a string suffix test or split would show up here)."""
    pieces = ("@prior", "+adapt", "+adabn", "+both", "+fourier")
    found = [f"{p.relative_to(SRC)}:{line}: {text!r}" for p in sorted(SRC.rglob("*.py")) if p.name != "sets.py"
             for line, text in _literals(p) if any(piece in text for piece in pieces)]
    assert not found, found


def _run(tmp_path) -> RunDir:
    run = RunDir.of(tmp_path / "runs", "m", 0, 1)
    run.path.mkdir(parents=True)
    run.checkpoint.write_bytes(b"weights")
    return run


def _table(v: float) -> pd.DataFrame:
    return pd.DataFrame({"id": [1, 2], "center": [1, 1], "label": [0, 1], **{f"v{k}": [v, -v] for k in range(8)}})


def test_a_run_folder_predicted_before_the_rename_still_reads(tmp_path):
    run = _run(tmp_path)
    lineage = run.tta.lineage("c0")
    record = {}
    for part in ("heldout", "test"):  # what `infer --adabn` wrote before 2026-12-07
        _table(1.0).to_csv(run.path / f"tta_{part}_adabn.csv", index=False)
        record |= {f"tta_{part}_adabn.csv": lineage, f"tta_{part}_adabn.csv:adapted": 3}
    record["tta_test_adabn.csv:adaptation"] = {"method": "AdaBN"}
    run.predictions.write_text(json.dumps(record))
    assert run.tta.path("test", ADAPTED).name == "tta_test_adabn.csv"
    assert run.tta.fresh("c0", ADAPTED) and run.tta.adapted_layers() == 6
    assert run.tta.adaptation() == {"method": "AdaBN"}
    # predicted again: the new name, the old file and its record gone (never two adapted files of one part)
    run.tta.write("test", ADAPTED, _table(2.0), "c0", adaptation={"changed": 1, "method": "feature shift coral"})
    assert run.tta.path("test", ADAPTED).name == "tta_test_adapted.csv"
    assert not (run.path / "tta_test_adabn.csv").exists() and (run.path / "tta_heldout_adabn.csv").exists()
    kept = json.loads(run.predictions.read_text())
    assert not any(k.startswith("tta_test_adabn.csv") for k in kept)
    assert run.tta.fresh("c0", ADAPTED) and run.tta.adapted_layers() == 3 + 1
    assert run.tta.adaptation() == {"method": "feature shift coral"}


def test_fourier_sets_come_from_the_record_not_from_file_names(tmp_path):
    run = _run(tmp_path)
    settings = {"beta": 0.03, "donors": 7, "per_center": 128, "pool": "p0"}
    for part in ("heldout", "test"):
        run.tta.write(part, PredictionSet.fourier(0.03), _table(1.0), "c0", settings=settings)
    _table(1.0).to_csv(run.path / "tta_test_fourier-b0.05.csv", index=False)  # a stray file: no record, no set
    _table(1.0).to_csv(run.path / "tta_heldout_fourier-b0.05.csv", index=False)
    assert run.tta.fourier_sets() == [PredictionSet.fourier(0.03)]
    assert run.tta.recorded_settings(PredictionSet.fourier(0.03, 3)) == settings  # the donors used: not the file's


def test_a_choice_of_the_text_era_is_refused_in_one_line(tmp_path):
    from histoshift.stack.folder import StackDir

    stack = tmp_path / "work" / "stack"
    stack.mkdir(parents=True)
    old = {"members": ["m/seed0"], "method": "mean+adabn", "adabn": True, "prediction_set": "+adabn",
           "lineage": {"cache": "c0"}}
    (stack / "choice.json").write_text(json.dumps(old))
    with pytest.raises(StaleError, match="not a choice of this version.*run the stack stage again"):
        StackDir(stack).choice()
    (stack / "choice.json").write_text(json.dumps([1, 2]))
    with pytest.raises(StaleError, match="not a choice of this version"):
        StackDir(stack).choice()
