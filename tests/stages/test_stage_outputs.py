"""Every stage through the CLI on tiny generated data: files, keys and idempotence."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from histoshift.cli import main
from histoshift.stack.folder import StackDir
from histoshift.stack.sets import ADAPTED, BOTH, METHODS, Label
from histoshift.runs import find_runs

from helpers import tiny_config

pytestmark = pytest.mark.slow  # every test here trains models (the quick tier leaves them out)

TINY = {
    **tiny_config(algorithm={"name": "dann"}, train={"epochs": 2, "num_workers": 0, "eval_batch_size": 32}),
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    cfg_a = root / "tiny_dann.yaml"
    cfg_a.write_text(yaml.safe_dump(TINY))
    cfg_b = root / "tiny_erm_albu.yaml"
    cfg_b.write_text(yaml.safe_dump(TINY | {"algorithm": {"name": "erm"}, "aug": {"backend": "albumentations"}}))
    r = ["--root", str(root)]
    assert main(r + ["demo-data", "--per-center", "24", "--test-size", "30"]) == 0
    assert main(r + ["prepare"]) == 0
    assert main(r + ["folds"]) == 0
    for cfg in (cfg_a, cfg_b):
        assert main(r + ["embed", "--config", str(cfg)]) == 0  # fine-tuned: nothing to embed
        assert main(r + ["train", "--config", str(cfg)]) == 0
    assert not (root / "work" / "features").exists()
    assert not list(root.glob("work/runs/*/seed*/fold*/tta_*.csv"))  # the infer stage's files, not train's
    assert main(r + ["infer"]) == 0
    assert main(r + ["stack"]) == 0
    assert main(r + ["submit", "--allow-degenerate"]) == 0  # 1-epoch tiny models may predict one class
    assert main(r + ["report"]) == 0
    return root


def test_every_fold_run_has_its_files(pipeline):
    runs = find_runs(pipeline / "work" / "runs")
    assert sorted(r.name for r in runs) == sorted(
        f"{c}/seed0/fold{k}" for c in ("tiny_dann", "tiny_erm_albu") for k in (0, 1, 3, 4))
    assert {r.kind for r in runs} == {"image"}
    folds = pd.read_csv(pipeline / "folds" / "folds.csv")
    test_ids = set(pd.read_csv(pipeline / "work" / "cache" / "index.csv").query("split == 'test'").id)
    for run in runs:
        metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2] and all(m["heldout_center"] == run.fold for m in metrics)
        assert yaml.safe_load(run.config.read_text())["model"]["backbone"] == "test_efficientnet"
        oof = pd.read_csv(run.oof)
        assert set(oof.id) == set(folds[folds.fold == run.fold].id) and (oof.center == run.fold).all()
        summary = json.loads(run.summary.read_text())
        assert {row["center"] for row in summary["per_center"]} == {0, 1, 3, 4}
        heldout = pd.read_csv(run.tta.heldout)
        assert [c for c in heldout.columns if c.startswith("v")] == [f"v{k}" for k in range(8)]
        assert set(heldout.id) == set(oof.id)
        test = pd.read_csv(run.tta.test)
        assert set(test.id) == test_ids and test.id.is_unique  # aberrant test patches are predicted too


def test_stack_and_submission(pipeline):
    choice = json.loads((pipeline / "work" / "stack" / "choice.json").read_text())
    assert choice["members"] == ["tiny_dann/seed0", "tiny_erm_albu/seed0"]
    assert set(choice["loco_accuracy"]) == {"mean", "rank", "stack", "mean@prior", "rank@prior", "stack@prior"}
    assert choice["prior_matching"]["share"] == 0.5
    sub = pd.read_csv(pipeline / "submissions" / "submission.csv")
    assert list(sub.columns) == ["ID", "Pred"] and len(sub) == 30 and set(sub.Pred) <= {0, 1}
    report = (pipeline / "work" / "report" / "report.md").read_text()
    assert "tiny_dann/seed0/fold3" in report and "Mean ensemble per held-out center" in report
    # every member's method beside its runs
    assert "| tiny_dann/seed0/fold3 | test_efficientnet fine-tuned, DANN |" in report
    assert "| tiny_erm_albu/seed0/fold0 | test_efficientnet fine-tuned, ERM |" in report
    for png in ("curves.png", "combiners.png", "per_center.png", "roc.png", "feature_map.png"):
        assert (pipeline / "work" / "report" / png).stat().st_size > 1000


def test_report_shows_the_data_and_the_feature_map_of_dann_beside_erm(pipeline):
    """The data overview prepare wrote is linked; the feature map pairs the DANN fold model with the ERM
    run of the same fold, each with how well a linear probe tells the centers apart."""
    cache = pipeline / "work" / "cache"
    for name in ("overview.png", "colours.png"):
        assert (cache / name).stat().st_size > 1000
    stats = pd.read_csv(cache / "colour_stats.csv")
    assert sorted(stats.center) == [0, 1, 2, 3, 4] and (stats.sampled > 0).all()
    assert stats.set_index("center").loc[1, "E_mean"] > stats.set_index("center").loc[2, "E_mean"]  # demo stains
    report = (pipeline / "work" / "report" / "report.md").read_text()
    assert "](../cache/overview.png)" in report and "](../cache/colours.png)" in report
    assert "tiny_dann/seed0/fold0 (DANN, held-out center 0): a linear probe tells the center" in report
    assert "tiny_erm_albu/seed0/fold0 (ERM, held-out center 0)" in report and "](feature_map.png)" in report
    assert "Prior matching (threshold at 50% positive)" in report


def test_stages_are_idempotent(pipeline, capsys):
    r = ["--root", str(pipeline)]
    run = find_runs(pipeline / "work" / "runs")[0]
    stamp = run.checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    assert main(r + ["prepare"]) == 0 and main(r + ["folds"]) == 0
    cfg = pipeline / "tiny_dann.yaml"
    assert main(r + ["train", "--config", str(cfg)]) == 0
    assert main(r + ["infer"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "done with this config, skipping" in out
    assert run.checkpoint.stat().st_mtime_ns == stamp


def test_a_changed_config_never_overwrites_a_finished_run(pipeline, capsys):
    r = ["--root", str(pipeline)]
    cfg = str(pipeline / "tiny_dann.yaml")
    assert main(r + ["train", "--config", cfg, "--fold", "3", "optim.lr=0.5"]) == 2
    assert "holds a finished run with another config" in capsys.readouterr().err
    assert main(r + ["train", "--config", cfg, "--fold", "2"]) == 2  # the test center is no fold


def test_bad_input_stops_prepare_with_a_message(tmp_path, capsys):
    (tmp_path / "input").mkdir()
    for name in ("train.h5", "val.h5", "test.h5"):
        (tmp_path / "input" / name).write_text("garbage")
    assert main(["--root", str(tmp_path), "prepare"]) == 2
    assert "train.h5: cannot be read as HDF5" in capsys.readouterr().err


@pytest.mark.parametrize("backend, workers", [("albumentations", 1), ("torch", 0)])
def test_training_is_reproducible(prepared_root, tmp_path, backend, workers):
    from histoshift.config import load_config
    from histoshift.runs import RunDir
    from histoshift.paths import Paths
    from histoshift.stages.train import train_fold

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY | {"aug": {"backend": backend, "hed_sigma": 0.05}}))
    cfg = load_config(path, ["train.epochs=1", f"train.num_workers={workers}"])
    outs = []
    for k in range(2):
        run = RunDir.of(tmp_path / f"runs{k}", cfg.name, 0, 3)
        train_fold(cfg, Paths(prepared_root), run)
        outs.append(pd.read_csv(run.oof))
    pd.testing.assert_frame_equal(outs[0], outs[1])


def test_frozen_backbone_feature_cache_and_heads(prepared_root, tmp_path):
    """Embed once (8 views), train a linear probe and an MLP+DANN head per fold, stack with them."""
    import numpy as np
    import torch

    from histoshift.config import load_config
    from histoshift.data.augment import dihedral, to_float
    from histoshift.data.cache import Cache
    from histoshift.models.backbone import PatchClassifier

    root = tmp_path / "root"
    import shutil
    shutil.copytree(prepared_root, root)
    r = ["--root", str(root)]
    frozen = tiny_config("feature", train={"epochs": 3, "eval_batch_size": 32})
    for name, extra in (("probe", {"algorithm": {"name": "erm"}}),
                        ("mlp_dann", {"algorithm": {"name": "dann"}, "model": frozen["model"] | {"head_hidden": 32}})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(frozen | extra))
    torch.manual_seed(0)  # the embed stage builds the random-init backbone first: a known init for the check below
    assert main(r + ["embed", "--config", str(tmp_path / "probe.yaml")]) == 0
    (store,) = (root / "work" / "features").iterdir()
    made = (store / "meta.json").stat().st_mtime_ns
    for name in ("probe", "mlp_dann"):  # train finds the embed stage's store: nothing is embedded again
        assert main(r + ["train", "--config", str(tmp_path / f"{name}.yaml")]) == 0
    assert (store / "meta.json").stat().st_mtime_ns == made
    stores = list((root / "work" / "features").iterdir())
    assert len(stores) == 1  # both configs share one embedding of the frozen backbone
    cache = Cache.open(root / "work" / "cache")
    feats = np.load(stores[0] / "features_val.npy")
    assert feats.shape == ((cache.index.split == "val").sum(), 8, 256) and feats.dtype == np.float16
    cfg = load_config(tmp_path / "probe.yaml")
    torch.manual_seed(0)  # the same random init as the embed stage's backbone
    model = PatchClassifier(cfg.model).eval()
    x = to_float(torch.from_numpy(np.array(cache.images("val")[:2])))
    with torch.no_grad():
        for k in (0, 5):
            want = model.backbone(model.preprocess(dihedral(x, k)))
            torch.testing.assert_close(torch.from_numpy(feats[:2, k]).float(), want, atol=2e-2, rtol=1e-2)
    runs = find_runs(root / "work" / "runs")
    assert len(runs) == 8 and {run.kind for run in runs} == {"feature"}
    assert not any(run.tta.heldout.exists() for run in runs)  # training never writes the infer stage's files
    assert main(r + ["infer", "--adabn"]) == 0
    for run in runs:
        assert len(pd.read_csv(run.tta.heldout).filter(like="v").columns) == 8
        assert set(pd.read_csv(run.tta.test).id) == set(cache.index[cache.index.split == "test"].id)
        # a head on stored features has nothing to adapt: its "adapted" predictions are the plain ones
        pd.testing.assert_frame_equal(pd.read_csv(run.tta.path("test", ADAPTED)), pd.read_csv(run.tta.test))
        assert run.tta.adapted_layers() == 0
    assert main(r + ["stack"]) == 0 and main(r + ["submit", "--allow-degenerate"]) == 0
    choice = json.loads((root / "work" / "stack" / "choice.json").read_text())
    assert choice["shipped"]["pset"]["kind"] == "plain" and choice["adapted_vs_plain"] is None  # no second set


def test_adabn_adapts_batchnorm_to_the_target_and_reruns_infer(pipeline, capsys):
    import numpy as np
    import torch

    from histoshift.data.augment import to_float
    from histoshift.data.cache import Cache
    from accelerate import Accelerator

    from histoshift.paths import Paths
    from histoshift.tasks import adapt_batchnorm, run_task

    run = find_runs(pipeline / "work" / "runs")[0]
    cache = Cache.open(pipeline / "work" / "cache")
    _, model = run_task(run, cache, Paths(pipeline), Accelerator())
    images = np.array(cache.images("test"))
    assert adapt_batchnorm(model, images, torch.device("cpu"), batch_size=10) > 0  # 3 equal batches
    model.eval()
    with torch.no_grad():
        stem = model.backbone.conv_stem(model.preprocess(to_float(torch.from_numpy(images))))
    torch.testing.assert_close(model.backbone.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    # a file ordered by slide (here: 30 faded patches, then the 30 originals) still gets the statistics
    # of the whole center, not the average of homogeneous batches (batches are drawn shuffled)
    ordered = np.concatenate([images // 3 + 170, images])
    adapt_batchnorm(model, ordered, torch.device("cpu"), batch_size=10)
    with torch.no_grad():
        stem = model.backbone.conv_stem(model.preprocess(to_float(torch.from_numpy(ordered))))
    ratio = model.backbone.bn1.running_var / stem.var(dim=(0, 2, 3))
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    before = pd.read_csv(run.tta.test)
    r = ["--root", str(pipeline)]
    assert main(r + ["infer", "--adabn"]) == 0
    assert "(AdaBN)" in capsys.readouterr().out
    adapted = pd.read_csv(run.tta.path("test", ADAPTED))
    assert (before.id == adapted.id).all() and not np.allclose(before.v0, adapted.v0)
    pd.testing.assert_frame_equal(pd.read_csv(run.tta.test), before)  # plain predictions stay as they were
    assert main(r + ["infer", "--adabn"]) == 0 and "(adapted) is up to date" in capsys.readouterr().out
    # the stack stage scores both prediction sets leave-one-center-out and says which one it used
    assert main(r + ["stack"]) == 0
    comparison = pd.read_csv(pipeline / "work" / "stack" / "comparison.csv")
    assert {"mean", "rank", "stack", "mean+adapt", "rank+adapt", "stack+adapt"} <= set(comparison.method)
    choice = StackDir(pipeline / "work" / "stack").require_choice("stack")  # the typed record
    means = comparison.groupby("method").accuracy.mean()
    base = Label(choice.shipped.combiner, choice.shipped.pset)  # prior matching is decided after combiner and set
    same_set = [str(Label(m, base.pset)) for m in METHODS if str(Label(m, base.pset)) in means]
    assert means[str(base)] == means[same_set].max()  # within the chosen set, the LOCO-best combiner
    assert choice.adapted == (base.pset in (ADAPTED, BOTH))
    assert choice.shipped.prior == choice.prior_matching["used"]
    evidence = choice.adapted_vs_plain
    from histoshift.stack.rules import DEFAULT, RULES

    assert choice.rule == DEFAULT and str(base) == choice.rule_picks[DEFAULT]  # the default rule's pick ships
    assert set(choice.rule_picks) == set(RULES) and choice.rule_summary == RULES[DEFAULT].summary
    assert evidence["paired"]["diff"] == pytest.approx(means[evidence["plain"]] - means[evidence["adapted"]], abs=0.02)
    assert main(r + ["report"]) == 0
    report = (pipeline / "work" / "report" / "report.md").read_text()
    assert f"McNemar z = {evidence['z_plain_over_adapted']:+.2f}" in report and f"by the rule '{DEFAULT}'" in report
    for p in pipeline.glob("work/runs/*/seed*/fold*/tta_*_adapted.csv"):  # the other tests expect plain ones only
        p.unlink()
    assert main(r + ["stack"]) == 0 and not StackDir(pipeline / "work" / "stack").require_choice("stack").adapted


def test_one_round_of_pseudo_labels(pipeline, capsys):
    """After a first round (train, infer, stack), confident test patches join the labelled data."""
    from histoshift.data.cache import Cache
    from histoshift.data.splits import pseudo_labels

    cache = Cache.open(pipeline / "work" / "cache")
    feats = pd.read_csv(pipeline / "work" / "stack" / "test_features.csv")
    means = feats.filter(like="__mean").mean(axis=1)
    threshold = float(1 / (1 + np.exp(-means.abs().median())))  # about half the patches are that sure
    extra = pseudo_labels(cache, threshold, pipeline / "work" / "stack")
    assert 0 < len(extra) < len(feats) and set(extra.split) == {"test"} and not extra.aberrant.any()
    sure = feats.set_index("id").loc[extra.id].filter(like="__mean").mean(axis=1)
    assert ((sure > 0).astype(int).to_numpy() == extra.label.to_numpy()).all()
    # `train --pseudo T` (PSEUDO=T bash train.sh): the config again under its own name, first round kept
    first = {r.name: r.summary.read_text() for r in find_runs(pipeline / "work" / "runs")}
    assert main(["--root", str(pipeline), "train", "--config", str(pipeline / "tiny_dann.yaml"), "--fold", "3",
                 "--pseudo", str(threshold), "train.epochs=1"]) == 0
    runs = {r.name: r for r in find_runs(pipeline / "work" / "runs")}
    assert set(runs) - set(first) == {"tiny_dann_pl/seed0/fold3"}
    assert all(runs[name].summary.read_text() == text for name, text in first.items())
    run = runs["tiny_dann_pl/seed0/fold3"]
    assert yaml.safe_load(run.config.read_text())["train"]["pseudo_threshold"] == pytest.approx(threshold)
    assert json.loads(run.summary.read_text())["pseudo_labels"] == len(extra)
    assert f"+ {len(extra)} pseudo-labelled test patches" in capsys.readouterr().out
    assert main(["--root", str(pipeline), "train", "--config", str(pipeline / "tiny_dann.yaml"), "--fold", "3",
                 "--pseudo", "0"]) == 2
    assert "--pseudo: expected a confidence threshold in (0.5, 1), got 0.0" in capsys.readouterr().err
