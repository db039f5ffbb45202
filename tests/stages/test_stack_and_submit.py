"""Stacking uses out-of-fold inputs only; combiners; the submission checker and writer."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from helpers import random_items, write_h5
from histoshift.data.cache import CACHE_VERSION, Cache
from histoshift.runs import RunDir
from histoshift.paired import mcnemar_z
from histoshift.stack.rules import RULES, Candidates
from histoshift.stack.combine import build_features, compare_loco, feature_columns, fit_stacker, rank_predict
from histoshift.stack.sets import ADAPTED, PLAIN, Label, PredictionSet
from histoshift.stages.stack import run_stack
from histoshift.stages.submit import SubmissionError, check_submission, write_submission


def _fake_runs(tmp_path, members=("a", "b"), n=40, seed=0, leak_fold=None):
    """Fold runs whose TTA files look like the infer stage's: logits informative about the label."""
    rng = np.random.default_rng(seed)
    centers = [0, 1, 3, 4]
    ids = np.arange(100, 100 + n * len(centers))
    folds = pd.DataFrame({"id": ids, "center": np.repeat(centers, n), "label": rng.integers(0, 2, len(ids))})
    folds["fold"] = folds["center"]
    (tmp_path / "folds").mkdir(exist_ok=True)
    folds.to_csv(tmp_path / "folds" / "folds.csv", index=False)
    test_ids = np.arange(9000, 9030)
    runs = []
    for m in members:
        for k in centers:
            run = RunDir.of(tmp_path / "runs", m, 0, k)
            run.path.mkdir(parents=True)
            # member "b" picked its epoch on the held-out center (train.early_stop_patience), "c" its averaging
            # window (train.average: swad)
            picked = {"b": "train: {early_stop_patience: 2}\n", "c": "train: {average: swad}\n"}.get(m, "")
            run.config.write_text(f"name: {m}\n" + picked)
            part = folds[folds.fold == k] if k != leak_fold else folds[folds.fold != k]
            logit = (part.label.to_numpy() * 2 - 1) * 1.5 + rng.normal(0, 1.2, (8, len(part)))
            t = pd.DataFrame({"id": part.id, "center": part.center, "label": part.label})
            for v in range(8):
                t[f"v{v}"] = logit[v]
            t.to_csv(run.tta.heldout, index=False)
            tt = pd.DataFrame({"id": test_ids, "center": 2, "label": -1})
            for v in range(8):
                tt[f"v{v}"] = rng.normal(0, 2, len(test_ids))
            tt.to_csv(run.tta.test, index=False)
            run.done.write_text("x")
            runs.append(run)
    _fake_lineage(tmp_path, runs, folds, test_ids)
    return runs, tmp_path / "folds" / "folds.csv", folds


def _fake_lineage(tmp_path, runs, folds, test_ids):
    """A cache index and manifest for those ids, and for every run the checkpoint, inputs and
    prediction records the train and infer stages would have written (the stack stage checks them)."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(exist_ok=True)
    index = pd.concat([folds.assign(split=np.where(folds.center == 1, "val", "train")),
                       pd.DataFrame({"id": test_ids, "center": 2, "label": -1, "split": "test"})])
    index.assign(row=0, aberrant=False, reason="").to_csv(cache_dir / "index.csv", index=False)
    digests = {s: f"digest-{s}" for s in ("train", "val", "test")}
    (cache_dir / "manifest.json").write_text(json.dumps({"version": CACHE_VERSION, "cache_id": "c0",
                                                         "splits": {s: {"digest": d} for s, d in digests.items()}}))
    for run in runs:
        save_file({"w": torch.full((2,), float(run.fold))}, str(run.checkpoint))
        run.inputs.write_text(json.dumps({"cache": digests}))
        refresh_predictions(run)


def refresh_predictions(run, cache_id="c0"):
    """Record the run's TTA files as predicted from its current checkpoint and the fake cache."""
    run.predictions.write_text(
        json.dumps({p.name: run.tta.lineage(cache_id) for p in run.path.glob("tta_*.csv")})
    )


def test_features_are_out_of_fold_and_exclude_the_center(tmp_path):
    runs, folds_csv, folds = _fake_runs(tmp_path)
    oof, test, names = build_features(runs, folds_csv, Cache.open(tmp_path / "cache"))
    assert names == ["a/seed0", "b/seed0"]
    assert sorted(oof.id) == sorted(folds.id) and oof.id.is_unique
    cols = feature_columns(names)
    assert "center" not in cols and all(c in oof.columns for c in cols)
    # each row's features are the TTA mean of the fold model that held its center out
    run = next(r for r in runs if r.model_name == "a/seed0" and r.fold == 3)
    t = pd.read_csv(run.tta.heldout).set_index("id")
    row = oof.set_index("id").loc[t.index[0]]
    assert row["a/seed0__mean"] == pytest.approx(t.iloc[0][[f"v{v}" for v in range(8)]].mean())
    disagree = {f"{n}__disagree" for n in names}  # test only: the unsupervised rule's criterion, never a feature
    assert len(test) == 30 and set(test.columns) == {"id", "center", *cols, *disagree}
    assert not disagree & set(cols) and not disagree & set(oof.columns)


def test_in_fold_predictions_are_refused(tmp_path):
    runs, folds_csv, _ = _fake_runs(tmp_path, leak_fold=3)
    with pytest.raises(ValueError, match="would not be out of fold"):
        build_features(runs, folds_csv, Cache.open(tmp_path / "cache"))


def test_stacker_refuses_unlabelled_rows(tmp_path):
    runs, folds_csv, _ = _fake_runs(tmp_path)
    oof, test, names = build_features(runs, folds_csv, Cache.open(tmp_path / "cache"))
    bad = pd.concat([oof, test.assign(label=-1)])
    with pytest.raises(ValueError, match="out-of-fold"):
        fit_stacker(bad, names)


def test_loco_comparison_scores_each_center_with_a_stacker_that_never_saw_it(tmp_path, monkeypatch):
    runs, folds_csv, _ = _fake_runs(tmp_path)
    oof, _, names = build_features(runs, folds_csv, Cache.open(tmp_path / "cache"))
    seen = []
    import histoshift.stack.combine as stack

    real_fit = stack.fit_stacker
    monkeypatch.setattr(
        stack, "fit_stacker", lambda rows, *a, **k: (seen.append(set(rows.center)), real_fit(rows, *a, **k))[1]
    )
    comparison = compare_loco(oof, names)
    assert seen == [{1, 3, 4}, {0, 3, 4}, {0, 1, 4}, {0, 1, 3}]
    assert set(comparison.method) == {"mean", "rank", "stack"} and len(comparison) == 12
    assert (comparison.accuracy > 0.7).all()  # the fake logits are informative


def test_rank_average_keeps_the_mean_positive_count():
    feats = pd.DataFrame({"a__mean": [-2.0, -1.0, 0.5, 3.0, 1.0], "b__mean": [-1.0, 0.1, 0.2, 2.0, 1.5]})
    ranks, pred = rank_predict(feats, ["a", "b"])
    assert pred.sum() == 3  # mean logits: -1.5, -0.45, 0.35, 2.5, 1.25
    assert pred.tolist() == [0, 0, 1, 1, 1]


FOURIER_1, FOURIER_7 = PredictionSet.fourier(0.03, 1), PredictionSet.fourier(0.03, 7)


def loco(c: pd.DataFrame, hits: dict | None = None):
    """The original rule's pick and evidence."""
    pick = RULES["loco"].pick(Candidates(c, hits or {}))
    return pick.label, pick.evidence.get("adapted_vs_plain"), pick.evidence.get("fourier")


def _rows(labels: list[Label], accuracy: list[float], center=0) -> pd.DataFrame:
    """compare_loco's rows by hand: typed labels, their text, a center, an accuracy."""
    return pd.DataFrame({"label": labels, "method": [str(x) for x in labels], "center": center, "accuracy": accuracy})


def test_choose_prefers_the_simpler_combiner_on_ties():
    combiners = [Label("mean"), Label("rank"), Label("stack")]
    c = _rows(combiners * 2, [0.9, 0.9, 0.9, 0.8, 0.8, 0.8], center=[0] * 3 + [1] * 3)
    for rule in ("loco", "margin", "rank_both", "adapted"):  # one set: each takes its LOCO-best combiner
        assert RULES[rule].pick(Candidates(c, {})).label == Label("mean")
    c.loc[5, "accuracy"] = 0.85
    assert loco(c) == (Label("stack"), None, None)


def test_run_stack_writes_scores_and_comparison(tmp_path):
    runs, folds_csv, _ = _fake_runs(tmp_path, members=("a", "b", "c"))
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache")
    assert result.heldout_selected == ["b/seed0", "c/seed0"]  # recorded: their out-of-fold accuracies are optimistic
    from histoshift.stack.folder import StackDir

    assert StackDir(tmp_path / "stack").choice() == result  # written and read through one record
    scores = pd.read_csv(tmp_path / "stack" / "test_scores.csv")
    assert len(scores) == 30 and set(scores.pred) <= {0, 1}
    assert result.shipped.combiner in ("mean", "rank", "stack") and result.shipped.pset == PLAIN
    assert result.method == str(result.shipped)
    written = pd.read_csv(tmp_path / "stack" / "comparison.csv")  # the label as text and as its fields
    assert list(written.columns[:4]) == ["method", "combiner", "set", "prior"]
    assert set(written.set) == {"plain"} and set(written.combiner) == {"mean", "rank", "stack"}
    assert (written.method == written.combiner + np.where(written.prior, "@prior", "")).all()  # each thresholded too


def _with_adabn(runs, adabn: str):
    """Give every fake fold run a config and AdaBN predictions: `same` as the plain ones, or held-out
    logits that are sharp for one set and noisy for the other (`better`: AdaBN sharp)."""
    from histoshift.config import Config, save_config

    rng = np.random.default_rng(1)
    for run in runs:
        save_config(Config(), run.config)
        for part in ("heldout", "test"):
            t = pd.read_csv(run.tta.path(part))
            if adabn != "same" and part == "heldout":
                views = [f"v{v}" for v in range(8)]
                sign = (t.label.to_numpy()[:, None] * 2 - 1)
                noisy = sign * 0.5 + rng.normal(0, 3.0, (len(t), 8))
                sharp = sign * 1.5 + rng.normal(0, 0.3, (len(t), 8))
                t[views] = noisy if adabn == "better" else sharp
                t.to_csv(run.tta.path(part), index=False)
                t[views] = sharp if adabn == "better" else noisy
            t.to_csv(run.tta.path(part, ADAPTED), index=False)
        refresh_predictions(run)


@pytest.mark.parametrize("adabn, kept", [("better", True), ("same", True), ("worse", False)])
def test_run_stack_keeps_adabn_unless_leave_one_center_out_shows_it_hurts(tmp_path, adabn, kept):
    runs, folds_csv, _ = _fake_runs(tmp_path)
    _with_adabn(runs, adabn)
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache")
    comparison = pd.read_csv(tmp_path / "stack" / "comparison.csv")
    assert {"mean+adapt", "rank+adapt", "stack+adapt"} <= set(comparison.method)
    assert result.adapted is kept and result.shipped.pset.adapted is kept
    z = result.adapted_vs_plain["z_plain_over_adapted"]
    assert {"better": z < -1.96, "same": z == 0, "worse": z > 1.96}[adabn]
    used = pd.read_csv(tmp_path / "stack" / "oof_features.csv")
    plain, _, names = build_features(runs, folds_csv, Cache.open(tmp_path / "cache"))
    assert np.allclose(used[f"{names[0]}__mean"], plain[f"{names[0]}__mean"]) is (adabn != "better")


def test_choose_keeps_adabn_unless_plain_is_significantly_better():
    mean, rank, mean_a, rank_a = Label("mean"), Label("rank"), Label("mean", ADAPTED), Label("rank", ADAPTED)
    c = _rows([mean, rank, mean_a, rank_a], [0.80, 0.78, 0.79, 0.79])
    right = np.ones(100, dtype=bool)
    plain, adapted = right.copy(), right.copy()
    plain[:4], adapted[4:9] = False, False  # plain wins 5 patches, the adapted set 4: noise
    hits = {mean: plain, rank: plain, mean_a: adapted, rank_a: adapted}
    # the best adapted combiner (ties go to the simpler one); z = (5 - 4) / sqrt(9)
    label, evidence, fourier = loco(c, hits)
    assert (label, fourier) == (mean_a, None)
    assert {k: evidence[k] for k in ("plain", "adapted", "z_plain_over_adapted")} == \
        {"plain": "mean", "adapted": "mean+adapt", "z_plain_over_adapted": 0.333}
    assert evidence["paired"]["diff"] == pytest.approx(0.01) and not evidence["paired"]["decisive"]
    adapted[10:30] = False  # now plain wins 25 patches, the adapted set 4: z = 21 / sqrt(29) = 3.9
    assert mcnemar_z(hits[mean], adapted) == pytest.approx(21 / np.sqrt(29))
    assert loco(c, hits | {mean_a: adapted, rank_a: adapted})[0] == mean
    with pytest.raises(ValueError, match="per-patch hits"):
        loco(c)


def test_adabn_predictions_are_ignored_when_missing_for_a_fold(tmp_path):
    runs, folds_csv, _ = _fake_runs(tmp_path)
    _with_adabn(runs, "better")
    runs[0].tta.path("test", ADAPTED).unlink()
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache")
    written = pd.read_csv(tmp_path / "stack" / "comparison.csv")
    assert not result.adapted and set(written.set) == {"plain"}


def _sub(ids, preds):
    return pd.DataFrame({"ID": ids, "Pred": preds})


@pytest.mark.parametrize("sub, message", [
    (pd.DataFrame({"id": [1, 2, 3], "Pred": [0, 1, 0]}), "columns"),
    (pd.DataFrame({"ID": [1, 2, 3], "Pred": [0, 1, 0], "x": 1}), "columns"),
    (_sub([1, 2, 2], [0, 1, 0]), "duplicate ID 2"),
    (_sub([1, 2], [0, 1]), "1 test ids missing"),
    (_sub([1, 2, 3, 4], [0, 1, 0, 1]), "1 ids not in test.h5"),
    (_sub([1, 2, 3], [0, 2, 0]), "Pred must be 0 or 1"),
    (_sub([1, 2, 3], [0, 0.5, 1]), "Pred must be 0 or 1"),
    (_sub([1, 2, None], [0, 1, 1]), "empty"),
])
def test_submission_checker_rejects_wrong_files(sub, message):
    with pytest.raises(SubmissionError, match=message):
        check_submission(sub, [1, 2, 3])


def test_submission_checker_accepts_a_valid_file():
    check_submission(_sub([3, 1, 2], [1, 0, 1]), [1, 2, 3])


def test_write_submission_checks_against_test_h5_and_keeps_earlier_ones(tmp_path):
    rng = np.random.default_rng(0)
    test_h5 = write_h5(tmp_path / "test.h5", random_items(rng, [5, 6, 7], 2))
    scores = tmp_path / "scores.csv"
    pd.DataFrame({"id": [5, 6, 7], "score": [0.1, 0.9, 0.2], "pred": [0, 1, 0]}).to_csv(scores, index=False)
    out = tmp_path / "submissions"
    path = write_submission(scores, test_h5, out)
    assert path.read_text() == "ID,Pred\n5,0\n6,1\n7,0\n"
    write_submission(scores, test_h5, out)  # same predictions: nothing to keep
    assert sorted(p.name for p in out.glob("submission*")) == ["submission.csv"]
    pd.DataFrame({"id": [5, 6, 7], "score": 0, "pred": [1, 1, 0]}).to_csv(scores, index=False)
    write_submission(scores, test_h5, out)
    files = sorted(p.name for p in out.glob("submission*"))
    assert len(files) == 2 and files[1] == "submission.csv"
    assert (out / files[0]).read_text() == "ID,Pred\n5,0\n6,1\n7,0\n"
    pd.DataFrame({"id": [5, 6], "score": 0, "pred": [1, 1]}).to_csv(scores, index=False)
    with pytest.raises(SubmissionError, match="missing"):
        write_submission(scores, test_h5, out)
    assert (out / "submission.csv").read_text() == "ID,Pred\n5,1\n6,1\n7,0\n"


def test_prior_match_predicts_the_share():
    from histoshift.stack.combine import prior_match

    score = np.array([0.2, 3.0, -1.0, 0.5, 2.0, -4.0])
    assert prior_match(score, 0.5).tolist() == [0, 1, 0, 1, 1, 0]
    assert prior_match(score, 1 / 3).sum() == 2 and prior_match(score, 0.0).sum() == 0


@pytest.mark.parametrize("shift", [3.0, 0.0])
def test_prior_matching_is_used_only_where_it_helps_leave_one_center_out(tmp_path, shift):
    """Logits biased towards tumour: the mean combiner's threshold over-calls and thresholding to the
    known share wins leave-one-center-out; whether the chosen combiner is thresholded so on the test
    center follows that evidence exactly."""
    runs, folds_csv, _ = _fake_runs(tmp_path)
    for run in runs:
        for part in ("heldout", "test"):
            t = pd.read_csv(run.tta.path(part))
            t[[f"v{v}" for v in range(8)]] += shift
            t.to_csv(run.tta.path(part), index=False)
        refresh_predictions(run)
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache", prior=0.5)
    comparison = pd.read_csv(tmp_path / "stack" / "comparison.csv")
    assert {"mean@prior", "rank@prior", "stack@prior"} <= set(comparison.method)
    matched = result.prior_matching
    means = comparison.groupby("method").accuracy.mean()
    base = Label(result.shipped.combiner, result.shipped.pset)
    assert matched["loco_with"] == pytest.approx(means[str(base.matched())], abs=1e-5)
    assert matched["used"] == (means[str(base.matched())] > means[str(base)])
    if shift:
        assert means["mean@prior"] > means["mean"] + 0.1
    assert result.shipped.prior == matched["used"] and result.method.endswith("@prior") == matched["used"]
    pred = pd.read_csv(tmp_path / "stack" / "test_scores.csv")["pred"]
    if matched["used"]:
        assert pred.sum() == len(pred) // 2
    never = run_stack(runs, folds_csv, tmp_path / "stack2", tmp_path / "cache", prior=None)
    assert never.prior_matching is None and not never.shipped.prior
    assert not pd.read_csv(tmp_path / "stack2" / "comparison.csv").prior.any()


def test_score_prints_the_accuracy_and_exits_zero(tmp_path, capsys):
    """`score` (the demo's last line) exits 0 whatever the accuracy: it reports, it does not judge."""
    from histoshift.cli import main

    (tmp_path / "submissions").mkdir()
    pd.DataFrame({"ID": [1, 2, 3, 4], "Pred": [1, 0, 0, 0]}).to_csv(
        tmp_path / "submissions" / "submission.csv", index=False
    )
    pd.DataFrame({"ID": [1, 2, 3, 4], "label": [1, 1, 0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    assert main(["--root", str(tmp_path), "score", "--labels", str(tmp_path / "labels.csv")]) == 0
    assert "score: test accuracy 0.5000 on 4 patches" in capsys.readouterr().out


def test_a_fourier_set_replaces_the_pick_only_when_significantly_better():
    labels = [Label("mean"), Label("mean", ADAPTED), Label("mean", FOURIER_1), Label("mean", FOURIER_7),
              Label("mean", PredictionSet.fourier(0.01, 7))]
    c = _rows(labels, [0.80, 0.80, 0.81, 0.83, 0.82])
    right = np.ones(200, dtype=bool)
    pick, best = right.copy(), right.copy()
    pick[:10], best[10:16] = False, False  # the best Fourier set wins 10 patches, loses 6: z = 1.0, noise
    hits = {label: best if label.pset == FOURIER_7 else pick for label in labels}
    label, _, fourier = loco(c, hits)
    assert label == labels[1] and {k: fourier[k] for k in ("fourier", "against", "z_fourier_over_pick", "used")} \
        == {"fourier": "mean+fourier-b0.03-n7", "against": "mean+adapt", "z_fourier_over_pick": 1.0, "used": False}
    best[10:16] = True  # now it wins 10, loses none: z = 3.16
    label, _, fourier = loco(c, hits)
    assert label == labels[3] and fourier["used"] and fourier["z_fourier_over_pick"] == pytest.approx(3.162)


def _with_fourier(runs, sharp: bool, settings: dict, donors: int = 7):
    """Give every fake fold run a Fourier set (`donors` views), recorded with `settings` as infer --fourier does;
    its held-out logits sharp (`sharp`) or as noisy as the plain ones."""
    rng = np.random.default_rng(2)
    for run in runs:
        for part in ("heldout", "test"):
            t = pd.read_csv(run.tta.path(part))[["id", "center", "label"]]
            sign = t.label.to_numpy()[:, None] * 2 - 1
            logits = sign * 1.5 + rng.normal(0, 0.3 if sharp else 1.2, (len(t), donors)) if part == "heldout" \
                else rng.normal(0, 2, (len(t), donors))
            for v in range(donors):
                t[f"v{v}"] = logits[:, v]
            run.tta.write(part, PredictionSet.fourier(0.03), t, "c0", settings=settings)


def test_the_stack_tries_each_number_of_donors_and_takes_a_fourier_set_that_wins(tmp_path):
    from histoshift.config import Config, save_config

    runs, folds_csv, _ = _fake_runs(tmp_path)
    rng = np.random.default_rng(3)
    for run in runs:  # plain held-out logits barely informative: a sharp Fourier set can win significantly
        save_config(Config(), run.config)
        t = pd.read_csv(run.tta.heldout)
        t[[f"v{v}" for v in range(8)]] = (t.label.to_numpy()[:, None] * 2 - 1) * 0.3 + rng.normal(0, 3.0, (len(t), 8))
        t.to_csv(run.tta.heldout, index=False)
        refresh_predictions(run)
    settings = {"beta": 0.03, "donors": 7, "per_center": 128, "pool": "p0"}
    _with_fourier(runs, sharp=True, settings=settings)
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache")
    methods = set(pd.read_csv(tmp_path / "stack" / "comparison.csv").method)
    assert {f"mean+fourier-b0.03-n{n}" for n in (1, 3, 7)} <= methods
    pset = result.shipped.pset
    assert (pset.kind, pset.beta, pset.donors in (1, 3, 7)) == ("fourier", 0.03, True)
    assert result.fourier_vs_pick["used"]
    assert result.shipped.combiner in ("mean", "rank", "stack")
    # the number of donors changes the features: n = 1 is the nearest donor's view alone
    oof1, _, names = build_features(runs, folds_csv, Cache.open(tmp_path / "cache"), FOURIER_1)
    run = next(r for r in runs if r.model_name == names[0] and r.fold == 0)
    t = pd.read_csv(run.tta.path("heldout", FOURIER_1)).set_index("id")
    assert run.tta.path("heldout", FOURIER_1).name == "tta_heldout_fourier-b0.03.csv"  # the donors: not in the name
    assert oof1.set_index("id").loc[t.index[0], f"{names[0]}__mean"] == pytest.approx(t.iloc[0]["v0"])

    # a set whose fold models disagree on the settings (another pool) is not compared at all
    other = next(r for r in runs if r.fold == 3)
    t = pd.read_csv(other.tta.path("test", FOURIER_7))
    other.tta.write("test", FOURIER_7, t, "c0", settings={**settings, "pool": "p1"})
    result = run_stack(runs, folds_csv, tmp_path / "stack", tmp_path / "cache")
    assert result.fourier_vs_pick is None and result.shipped.pset in (PLAIN, ADAPTED)
