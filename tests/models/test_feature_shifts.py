"""Feature-level adaptation (models/feature_shift.py) on generated features with a known shift: per-center
standardisation and CORAL recover a classifier's accuracy on a shifted copy of its own training features,
from the target's features alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from histoshift.config import FEATURE_SHIFTS, FeatureModelCfg
from histoshift.stack.sets import ADAPTED
from histoshift.models.feature_shift import SHIFTS, FeatureShift, coral_map, covariance, moments
from histoshift.models.head import FeatureClassifier

from helpers import tiny_config

D = 12


def _center(n: int, seed: int, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """n x 8 views x D features of two classes (means -1 / +1 on the first 3 dimensions), optionally
    shifted by an affine map (x @ M + b): the same biology seen through another hospital."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    mu = torch.zeros(2, D)
    mu[:, :3] = torch.tensor([[-1.0], [1.0]])
    x = mu[y][:, None, :] + torch.randn(n, 8, D, generator=g)
    if transform is not None:
        m, b = transform
        x = x @ m + b
    return x, y


def _shift(seed: int):
    """A symmetric positive-definite mixing and an offset (CORAL's affine family)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    m = q @ torch.diag(torch.linspace(0.3, 3.0, D)) @ q.T
    return m, 4 * torch.randn(D, generator=g)


def _fit(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """A linear probe by full-batch gradient descent on every view (deterministic)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(D, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    xs, ys = x.reshape(-1, D), y.repeat_interleave(x.shape[1]).float()
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(xs).squeeze(1), ys).backward()
        opt.step()
    return head


def _accuracy(head, x, y) -> float:
    with torch.no_grad():
        return float(((head(x.mean(1)).squeeze(1) > 0).long() == y).float().mean())


def test_the_config_names_every_shift():
    assert SHIFTS == FEATURE_SHIFTS and FeatureModelCfg().feature_shift == "none"


def test_coral_recovers_a_shifted_copy_of_the_training_features():
    sources = [_center(400, seed) for seed in (1, 2, 3)]
    x_src, y_src = torch.cat([x for x, _ in sources]), torch.cat([y for _, y in sources])
    head = _fit(x_src, y_src)
    x_tgt, y_tgt = _center(600, 4, _shift(5))
    home = _accuracy(head, *_center(600, 4))
    assert home > 0.9
    assert _accuracy(head, x_tgt, y_tgt) < home - 0.2  # the hospital's shift breaks the probe
    shift = FeatureShift(D, "coral", ridge=0.01)
    shift.fit_source([x for x, _ in sources])
    assert shift(x_tgt) is x_tgt  # plain: the identity until adapted
    assert shift.adapt_to(x_tgt) == 1
    assert _accuracy(head, shift(x_tgt), y_tgt) > home - 0.03
    # without the ridge, the map gives the target exactly the source's moments
    exact = FeatureShift(D, "coral", ridge=0.0)
    exact.fit_source([x for x, _ in sources])
    exact.adapt_to(x_tgt)
    mean, cov = covariance(exact(x_tgt))
    s_mean, s_cov = covariance(x_src)
    assert torch.allclose(mean, s_mean, atol=1e-3) and torch.allclose(cov, s_cov, atol=1e-3)


def test_per_center_standardisation_recovers_a_shifted_center():
    centers = [_center(400, seed, _shift(10 + seed)) for seed in (1, 2, 3)]  # every center its own scanner
    x_src = torch.cat([x for x, _ in centers])
    y_src = torch.cat([y for _, y in centers])
    ids = np.repeat([0, 3, 4], 400)
    standardised = x_src.clone()  # as the task's streams standardise a batch: (x - its center's mean) / std
    for c in (0, 3, 4):
        mean, std = moments(x_src[torch.from_numpy(ids == c)])
        standardised[torch.from_numpy(ids == c)] = ((x_src[torch.from_numpy(ids == c)].double() - mean) / std).float()
    for c in (0, 3, 4):
        mean, std = moments(standardised[torch.from_numpy(ids == c)])
        assert torch.allclose(mean, torch.zeros(D, dtype=mean.dtype), atol=1e-5)
        assert torch.allclose(std, torch.ones(D, dtype=std.dtype), atol=1e-5)
    x_tgt, y_tgt = _center(600, 4, (torch.diag(torch.linspace(0.5, 2.5, D)), 3 * torch.ones(D)))
    shift = FeatureShift(D, "standardize")
    shift.fit_source([x for x, _ in centers])
    head = _fit(standardised, y_src)
    shift.eval()
    plain = _accuracy(head, shift(x_tgt), y_tgt)  # the training centers' pooled moments
    assert shift.adapt_to(x_tgt) == 1
    adapted = _accuracy(head, shift(x_tgt), y_tgt)
    assert adapted > 0.85 and adapted > plain + 0.1


def test_the_map_is_deterministic_and_none_is_the_identity():
    """The same features give the same map, bit for bit; `none` maps nothing and stores nothing. (That no label
    of the target is read is tested on whole runs below: scrambled labels, the same adapted head.)"""
    x, _ = _center(300, 7, _shift(8))
    src = [_center(300, 1)[0]]
    maps = []
    for _ in range(2):
        shift = FeatureShift(D, "coral")
        shift.fit_source(src)
        shift.adapt_to(x)
        maps.append(shift.affine)
    assert all(torch.equal(a, b) for a, b in zip(*maps))
    none = FeatureShift(D, "none")
    assert none.adapt_to(x) == 0 and none(x) is x and not list(none.state_dict())
    with pytest.raises(ValueError, match="expected one of"):
        FeatureShift(D, "whiten")


def test_a_head_carries_its_shift_in_the_checkpoint():
    head = FeatureClassifier(D, FeatureModelCfg(feature_shift="standardize", head_hidden=8))
    head.shift.fit_source([_center(50, 1)[0] * 3 + 1])
    state = head.state_dict()
    assert {"shift.mean", "shift.std"} <= set(state)
    again = FeatureClassifier(D, FeatureModelCfg(feature_shift="standardize", head_hidden=8))
    again.load_state_dict(state)
    assert torch.equal(again.shift.mean, head.shift.mean)
    plain = FeatureClassifier(D, FeatureModelCfg(head_hidden=8))
    assert not any(k.startswith("shift.") for k in plain.state_dict())  # old checkpoints load unchanged


def test_coral_map_is_the_identity_on_the_source_itself():
    x, _ = _center(2000, 3)
    mean, cov = covariance(x)
    a, b = coral_map(mean, cov, x, ridge=0.0)
    assert torch.allclose(a, torch.eye(D, dtype=a.dtype), atol=1e-6) and b.abs().max() < 1e-6


@pytest.mark.slow
def test_heads_adapt_their_feature_shift_in_the_pipeline(prepared_root, tmp_path):
    """Heads with feature_shift coral / standardize: trained on one store, `infer --adapt` re-estimates their
    shift on every target center (1 map adapted, predictions change), the stack stage weighs plain against
    adapted by leave-one-center-out evidence and writes it to choice.json; labels of a target center are
    never read (scrambling them in the table handed to `adapt` gives the same adapted head)."""
    import json
    import shutil

    import pandas as pd
    import yaml
    from accelerate import Accelerator

    from histoshift.cli import main
    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.data.splits import training_rows
    from histoshift.runs import find_runs
    from histoshift.tasks import load_experiment, make_task

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    r = ["--root", str(root)]
    base = tiny_config("feature", algorithm={"name": "dann"}, model={"head_hidden": 16},
                       train={"epochs": 2, "eval_batch_size": 32})
    for shift, algorithm, rounds in (("coral", "dann", 0), ("standardize", "erm", 2)):
        config = {**base, "model": {**base["model"], "feature_shift": shift, "self_train_rounds": rounds,
                                    "self_train_threshold": 0.501}, "algorithm": {"name": algorithm}}
        (tmp_path / f"{shift}.yaml").write_text(yaml.safe_dump(config))
        assert main(r + ["train", "--config", str(tmp_path / f"{shift}.yaml")]) == 0
    # and a sparse probe (no shift): its kept dimensions per fold go to summary.json and the report
    sparse = {**base, "model": {**base["model"], "head_hidden": 0, "head_l1": 0.003}, "algorithm": {"name": "erm"}}
    (tmp_path / "sparse.yaml").write_text(yaml.safe_dump(sparse))
    assert main(r + ["train", "--config", str(tmp_path / "sparse.yaml")]) == 0
    assert len(list((root / "work" / "features").iterdir())) == 1  # one store for every head
    assert main(r + ["infer", "--adapt"]) == 0
    runs = find_runs(root / "work" / "runs")
    assert len(runs) == 12
    summaries = [json.loads(run.summary.read_text()) for run in runs if run.cfg.model.head_l1 > 0]
    assert len(summaries) == 4 and all(0 < len(s["kept_dims"]) < s["dims"] == 256 for s in summaries)
    for run in (run for run in runs if run.cfg.model.feature_shift != "none"):
        # one map (+ 2 self-training rounds), re-estimated on the held-out and on the test center
        assert run.tta.adapted_layers() == 2 * (1 + run.cfg.model.self_train_rounds)
        plain, adapted = pd.read_csv(run.tta.test), pd.read_csv(run.tta.path("test", ADAPTED))
        assert (plain.filter(like="v") - adapted.filter(like="v")).abs().to_numpy().max() > 1e-4
        recorded = json.loads(run.predictions.read_text()).get("tta_test_adapted.csv:adaptation")
        if run.cfg.model.self_train_rounds:  # the threshold and the pseudo-labels per round are recorded
            st = recorded["self_training"]
            assert recorded["method"] == "feature shift standardize + self-training x2"
            assert st["threshold"] == 0.501 and len(st["pseudo_labelled"]) == 2 and st["pseudo_labelled"][0] > 0
        else:
            assert recorded == {"method": "feature shift coral"}
    assert main(r + ["stack"]) == 0
    choice = json.loads((root / "work" / "stack" / "choice.json").read_text())
    assert choice["adapted_vs_plain"]["paired"]  # the plain-or-adapted evidence is recorded
    assert main(r + ["report"]) == 0
    report = (root / "work" / "report" / "report.md").read_text()
    assert "## Sparse heads" in report and "| sparse/seed0 | 256 |" in report
    adaptations = choice["adaptations"]  # how every fold model's adapted predictions were made, in the report too
    assert len(adaptations) == 12 and adaptations["coral/seed0/fold0"] == {"method": "feature shift coral"}
    assert "- standardize/seed0/fold0: feature shift standardize + self-training x2 (confidence >= 0.501: " in report
    # no label of the target is read: the same adapted head from a table whose labels are scrambled (the
    # held-out center's labels are real, so scrambling them would show a leak)
    for shift in ("coral", "standardize"):
        task = make_task(load_experiment(tmp_path / f"{shift}.yaml"), Cache.open(root / "work" / "cache"),
                         Paths(root), Accelerator(cpu=True))
        run = next(r for r in runs if r.cfg.model.feature_shift == shift)
        model = task.load(run)
        table = task.cache.index.query(f"center == {run.fold}")
        scrambled = table.assign(label=table["label"].sample(frac=1, random_state=0).to_numpy())
        source = training_rows(task.cache.index, run.fold)
        (a, rec_a), (b, rec_b) = task.adapt(model, table, source), task.adapt(model, scrambled, source)
        assert rec_a == rec_b
        a, b = task.acc.unwrap_model(a), task.acc.unwrap_model(b)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        if shift == "coral":
            assert all(torch.equal(x, y) for x, y in zip(a.shift.affine, b.shift.affine))


def test_the_sparse_probe_zeroes_dimensions_exactly():
    """The proximal L1 step leaves exact zeros; a dimension the labels never need goes, one they need stays."""
    head = FeatureClassifier(D, FeatureModelCfg(head_l1=0.1, drop_rate=0.0))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    x, y = _center(400, 1)
    x = x[:, 0]
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(x)["logits"], y.float()).backward()
        opt.step()
        head.after_step(opt)
    kept = head.sparsity()
    assert kept["dims"] == D and set(kept["kept_dims"]) <= set(range(D))
    assert {0, 1, 2} <= set(kept["kept_dims"]) and len(kept["kept_dims"]) < D  # the class lives in dims 0-2
    weight = head.head[-1].weight.detach().flatten()
    assert (weight == 0).sum() == D - len(kept["kept_dims"])
    dense = FeatureClassifier(D, FeatureModelCfg())
    dense.after_step(opt)  # no L1: nothing happens, nothing reported
    assert dense.sparsity() == {}


def test_sparse_head_config_and_jaccard():
    from histoshift.config import ConfigError, validated
    from histoshift.plots import jaccard

    with pytest.raises(ConfigError, match="head_l1"):
        validated({"model": {"kind": "feature", "head_hidden": 16, "head_l1": 0.01}})
    with pytest.raises(ConfigError, match="feature_shift"):
        validated({"model": {"feature_shift": "coral"}})
    assert jaccard([{1, 2, 3}, {2, 3, 4}]) == 0.5 and jaccard([{1}]) == 1.0
    assert jaccard([{1, 2}, {1, 2}, {3}]) == pytest.approx((1 + 0 + 0) / 3)


def test_chunked_statistics_match_the_whole_tensor_and_scale_to_large_offsets(monkeypatch):
    """Moments and covariances accumulate in float64 chunks (no float64 copy of a whole center): the same numbers
    as the direct computation, also for features far from zero (the accumulators are shifted)."""
    import histoshift.models.feature_shift as fs

    x = (torch.randn(5000, 3, 16) * 0.5 + 300.0).half()  # float16 as stored, a large common offset
    exact = x.reshape(-1, 16).double()
    monkeypatch.setattr(fs, "CHUNK_VALUES", 7 * 16 + 5)  # many chunks of an odd size (7 rows)
    mean, std = fs.moments(x)
    torch.testing.assert_close(mean, exact.mean(0), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(std, exact.std(0, unbiased=False), atol=1e-7, rtol=1e-7)
    c_mean, cov = fs.covariance(x)
    d = exact - exact.mean(0)
    torch.testing.assert_close(cov, d.T @ d / (len(exact) - 1), atol=1e-7, rtol=1e-7)


def test_training_standardises_with_the_statistics_of_the_views_inference_uses(prepared_root, tmp_path):
    """One rule for the views that feed statistics: a head's training rows are standardised per center with the
    moments of the TTA views, as its shift is at inference and adaptation, even when the store also holds HED
    views of labelled patches (they used to enter training's moments: 10 views there, 8 at inference)."""
    from accelerate import Accelerator

    from histoshift.config import validated
    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.tasks import make_task

    from helpers import tiny_config

    cfg = validated(tiny_config("feature", model={"feature_shift": "standardize", "feature_hed_views": 2,
                                                  "feature_hed_sigma": 0.3}))
    task = make_task(cfg, Cache.open(prepared_root / "work" / "cache"), Paths(tmp_path), Accelerator(cpu=True))
    store = task.stored_data()
    assert store.arrays["train"].shape[1] == 10 and task.stat_views == store.views == 8
    table = task.cache.index.query("split == 'train' and center == 0")
    trained = task._inputs(table).tensor()  # what the head trains on: every stored view, standardised
    tta = torch.from_numpy(store.rows(table, 8)).double()
    mean, std = tta.reshape(-1, tta.shape[-1]).mean(0), tta.reshape(-1, tta.shape[-1]).std(0, unbiased=False)
    torch.testing.assert_close(trained[:, :8].double(), ((tta - mean) / std).to(trained.dtype).double(),
                               atol=2e-3, rtol=0)
