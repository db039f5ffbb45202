"""`python -m histoshift --help` and every sub-command's help say what the stage reads and writes,
and what they say is true: after a real (tiny) run, every file a stage's help names exists."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from histoshift.cli import build_parser, main
from histoshift.stages import ORDER, command

STAGES = {command(name): __import__(f"histoshift.stages.{name}", fromlist=["STAGE"]).STAGE for name in ORDER}

from helpers import REPO


def _subparsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_every_sub_command_is_a_described_stage():
    assert set(_subparsers()) == set(STAGES)


def test_top_level_help_shows_each_stage_reads_and_writes():
    out = subprocess.run([sys.executable, "-m", "histoshift", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}, check=True).stdout
    assert "reads -> writes" in out
    for name, stage in STAGES.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(stage.flow)}$", out, re.M), name
    assert "input/*.h5 -> work/cache/" in out and "-> submissions/submission.csv" in out


@pytest.mark.skipif(not sys.executable.startswith(str(REPO / ".venv")), reason="runs in the repository's own .venv")
def test_the_venv_runs_the_cli_from_anywhere(tmp_path):
    """scripts/env.sh puts src/ on .venv's path: the README's `python -m histoshift` needs no PYTHONPATH."""
    out = subprocess.run([sys.executable, "-m", "histoshift", "folds", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "writes: folds/folds.csv" in out.stdout


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_help_names_inputs_outputs_and_every_option(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "\nreads:  " in out and "\nwrites: " in out
    for action in _subparsers()[name]._actions:
        assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


def _named_files(text: str) -> set[str]:
    """File names a help text lists (brace sets expanded; wildcards and placeholders left out)."""
    names = set()
    for token in re.findall(r"[\w{},.<>*-]+\.(?:npy|csv|json|png|md|yaml|safetensors)\b|\bdone\b", text):
        if "*" in token or "<" in token:
            continue
        m = re.fullmatch(r"(.*)\{(.+)\}(.*)", token)
        names |= {f"{m[1]}{part}{m[3]}" for part in m[2].split(",")} if m else {token}
    return names


@pytest.mark.slow
def test_what_the_help_says_is_written_exists(finished):
    """prepare, folds, embed, train, infer, stack, submit, report."""
    assert main(["--root", str(finished), "report"]) == 0
    run = next((finished / "work" / "runs").glob("*/seed0/fold0"))
    (store,) = (finished / "work" / "features").iterdir()
    where = {"prepare": finished / "work" / "cache", "folds": finished / "folds", "embed": store, "train": run,
             "stack": finished / "work" / "stack", "submit": finished / "submissions",
             "report": finished / "work" / "report"}
    checked = 0
    for name, folder in where.items():
        text = STAGES[name].writes
        if name == "report":
            text = text.split(";")[0]  # feature_map.png needs a fine-tuned run; this one is a frozen head
        for file in _named_files(text):
            assert (folder / file.split("/")[-1]).exists(), f"{name} --help names {file}, not in {folder}"
            checked += 1
    assert checked >= 20
    infer = {f for f in _named_files(STAGES["infer"].writes) if "adabn" not in f}
    assert infer == {"tta_heldout.csv", "tta_test.csv", "predictions.json"}
    assert all((run / f).exists() for f in infer)


def test_named_files_parser():
    assert _named_files("work/cache/: images_{train,val,test}.npy, index.csv; tta_*_adabn.csv, done") == {
        "images_train.npy", "images_val.npy", "images_test.npy", "index.csv", "done"}


def test_every_stage_module_is_named_as_its_stage():
    from histoshift.stages import ORDER

    modules = {p.stem for p in (REPO / "src" / "histoshift" / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(ORDER)
    assert "stain-gan" in _subparsers() and "fm-standin" in _subparsers()


def test_infer_takes_adapt_and_the_older_adabn():
    parser = build_parser()
    assert parser.parse_args(["infer", "--adapt"]).adapt and parser.parse_args(["infer", "--adabn"]).adapt
    assert not parser.parse_args(["infer"]).adapt
