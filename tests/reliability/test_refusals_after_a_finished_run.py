"""Faults a user meets after a finished pipeline (issue 10, first part): moved-aside runs, NaN weights,
degenerate submissions, a write that fails half-way. Each must end in one clear line or be harmless;
none may yield a silently wrong submission or lose the previous one."""
from __future__ import annotations

import errno

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from histoshift.cli import main
from histoshift.runs import find_runs

from helpers import one_error_line  # the fixtures finished / pipeline_root are in conftest.py


@pytest.mark.slow
def test_runs_moved_aside_by_force_are_not_discovered(finished, tmp_path, capsys):
    r = ["--root", str(finished)]
    assert main(r + ["train", "--config", str(tmp_path / "head.yaml"), "--fold", "0", "--force"]) == 0
    aside = list((finished / "work" / "runs" / "head" / "seed0").glob("fold0.old-*"))
    assert len(aside) == 1 and (aside[0] / "done").exists()
    assert sorted(run.fold for run in find_runs(finished / "work" / "runs")) == [0, 1, 3, 4]
    assert main(r + ["stack"]) == 2  # the retrained fold's predictions are the infer stage's to write
    assert main(r + ["infer"]) == 0 and main(r + ["stack"]) == 0 and main(r + ["report"]) == 0


@pytest.mark.slow
def test_nan_logits_stop_the_stage_that_meets_them(finished, capsys):
    """Predictions with NaN never reach a submission: the stack stage names the file and an id, and a
    model whose weights are NaN is refused by infer before anything is written."""
    run = find_runs(finished / "work" / "runs")[0]
    table = pd.read_csv(run.tta.test)
    table.loc[3, "v2"] = np.nan
    table.to_csv(run.tta.test, index=False)
    before = (finished / "submissions" / "submission.csv").read_text()
    assert main(["--root", str(finished), "stack"]) == 2
    line = one_error_line(capsys)
    assert str(run.tta.test) in line and f"id {int(table.loc[3, 'id'])}" in line and "non-finite" in line
    assert (finished / "submissions" / "submission.csv").read_text() == before


@pytest.mark.slow
def test_a_model_with_nan_weights_is_refused_at_inference(pipeline_root, capsys):
    run = find_runs(pipeline_root / "work" / "runs")[0]
    weights = load_file(str(run.checkpoint))
    weights = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() and k.startswith("head") else v)
               for k, v in weights.items()}
    save_file(weights, str(run.checkpoint))
    old = pd.read_csv(run.tta.test)
    assert main(["--root", str(pipeline_root), "infer"]) == 2
    line = one_error_line(capsys)
    assert str(run.path) in line and "non-finite logits" in line and "nothing was written" in line
    pd.testing.assert_frame_equal(pd.read_csv(run.tta.test), old)


@pytest.mark.slow
def test_degenerate_submission_needs_consent(finished, capsys):
    scores = finished / "work" / "stack" / "test_scores.csv"
    table = pd.read_csv(scores)
    table["pred"] = 0
    table.to_csv(scores, index=False)
    before = (finished / "submissions" / "submission.csv").read_text()
    r = ["--root", str(finished), "submit"]
    assert main(r) == 2
    line = one_error_line(capsys)
    assert f"every one of the {len(table)} test patches is predicted 0" in line and "--allow-degenerate" in line
    assert (finished / "submissions" / "submission.csv").read_text() == before
    assert main(r + ["--allow-degenerate"]) == 0
    assert set(pd.read_csv(finished / "submissions" / "submission.csv").Pred) == {0}


@pytest.mark.slow
def test_a_failed_write_keeps_the_previous_submission(finished, monkeypatch, capsys):
    """A full disk while writing the new submission: the old one stays as submission.csv."""
    scores = finished / "work" / "stack" / "test_scores.csv"
    table = pd.read_csv(scores)
    table["pred"] = 1 - table["pred"]  # other predictions than the submitted ones
    table.to_csv(scores, index=False)
    subs = finished / "submissions"
    before = (subs / "submission.csv").read_text()

    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    assert main(["--root", str(finished), "submit", "--allow-degenerate"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "the previous one is untouched" in line
    assert (subs / "submission.csv").read_text() == before
    assert sorted(p.name for p in subs.glob("submission*")) == ["submission.csv"]
