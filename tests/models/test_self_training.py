"""Self-training of heads on frozen features (models/self_training.py) on generated features with a known
shift: confident rounds move the boundary towards the target, the source stays right, nothing of the target
but its features is used."""
from __future__ import annotations

import copy

import pytest
import torch

from histoshift.config import ConfigError, FeatureModelCfg, load_config
from histoshift.models.head import FeatureClassifier
from histoshift.models.self_training import SelfTraining

D = 12


def _center(n: int, seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n x 8 views x D: classes at -1 / +1 on the first 3 dimensions, moved by `offset` (another hospital)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    mu = torch.zeros(2, D)
    mu[:, :3] = torch.tensor([[-1.0], [1.0]])
    return mu[y][:, None, :] + 0.7 * torch.randn(n, 8, D, generator=g) + offset, y


def _trained_head() -> tuple[FeatureClassifier, tuple, tuple]:
    source = _center(600, 0, torch.zeros(D))
    offset = torch.zeros(D)
    offset[:2] = torch.tensor([1.5, 1.0])  # the boundary now cuts through the target's negatives
    target = _center(600, 1, offset)
    torch.manual_seed(0)
    head = FeatureClassifier(D, FeatureModelCfg(drop_rate=0.0))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    x, y = source[0].reshape(-1, D), source[1].repeat_interleave(8).float()
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head.classify(x), y).backward()
        opt.step()
    return head, source, target


def _accuracy(head, x, y) -> float:
    with torch.no_grad():
        return float(((head.classify(x.mean(1)) > 0).long() == y).float().mean())


def test_rounds_recover_accuracy_on_a_shifted_center_and_keep_the_source():
    head, (xs, ys), (xt, yt) = _trained_head()
    before = _accuracy(head, xt, yt)
    assert _accuracy(head, xs, ys) > 0.99 and before < 0.93  # the shift costs the plain head
    gains = []
    for rounds in (1, 3, 5):
        adapted = copy.deepcopy(head)
        record = SelfTraining(rounds, 0.9, 0.01, 64)(adapted, xs, ys, xt)["self_training"]
        assert record["rounds"] == rounds and record["threshold"] == 0.9 and len(record["pseudo_labelled"]) == rounds
        assert all(0 < n < len(xt) for n in record["pseudo_labelled"])  # only the confident patches
        assert _accuracy(adapted, xs, ys) > 0.99
        gains.append(_accuracy(adapted, xt, yt) - before)
    assert gains[0] > 0 and gains[2] > gains[0] and gains[2] > 0.03  # measured: +1.5, +4.2, +5.5 points


def test_it_is_deterministic_and_zero_rounds_change_nothing():
    head, (xs, ys), (xt, _) = _trained_head()
    head.head[0].p = 0.3  # dropout draws are seeded too
    a, b, c = copy.deepcopy(head), copy.deepcopy(head), copy.deepcopy(head)
    assert SelfTraining(2, 0.8, 0.01, 64, seed=3)(a, xs, ys, xt) == SelfTraining(2, 0.8, 0.01, 64, seed=3)(
        b, xs, ys, xt
    )
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert SelfTraining(0, 0.8, 0.01, 64)(c, xs, ys, xt)["self_training"]["pseudo_labelled"] == []
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), head.parameters()))


def test_a_threshold_no_prediction_reaches_stops_without_training():
    head, (xs, ys), (xt, _) = _trained_head()
    adapted = copy.deepcopy(head)
    with torch.no_grad():
        adapted.head[-1].weight.zero_()
        adapted.head[-1].bias.zero_()  # every probability 0.5: nothing is confident
    frozen = copy.deepcopy(adapted)
    record = SelfTraining(3, 0.99, 0.01, 64)(adapted, xs, ys, xt)["self_training"]
    assert record["pseudo_labelled"] == [0]
    assert all(torch.equal(p, q) for p, q in zip(adapted.parameters(), frozen.parameters()))


def test_the_shift_is_never_trained_and_a_sparse_probe_stays_sparse():
    head, (xs, ys), (xt, _) = _trained_head()
    sparse = FeatureClassifier(D, FeatureModelCfg(drop_rate=0.0, head_l1=0.05, feature_shift="standardize"))
    sparse.load_state_dict(head.state_dict(), strict=False)
    with torch.no_grad():
        sparse.head[-1].weight[0, 6:] = 0.0
    # the shift is statistics (buffers) only: nothing an optimizer over the head's parameters could move...
    assert list(sparse.shift.state_dict()) and not list(sparse.shift.parameters())
    shift = copy.deepcopy(sparse.shift.state_dict())
    head_before = copy.deepcopy(sparse.head.state_dict())
    SelfTraining(2, 0.9, 0.01, 64)(sparse, xs, ys, xt)
    # ...and self-training does not re-estimate it (the target's statistics stay those adapt_to set)
    assert all(torch.equal(shift[k], v) for k, v in sparse.shift.state_dict().items())
    assert not all(torch.equal(head_before[k], v) for k, v in sparse.head.state_dict().items())  # it did train
    assert (sparse.head[-1].weight[0, 6:] == 0).all()  # no noise dimension comes back


def test_config_bounds_and_kinds():
    with pytest.raises(ValueError, match=r"\(0.5, 1\)"):
        SelfTraining(1, 0.5, 0.01, 64)
    with pytest.raises(ConfigError, match="self_train_threshold"):
        load_config(overrides=["model.kind=feature", "model.self_train_threshold=1.0"])
    with pytest.raises(ConfigError, match="unknown config key 'model.self_train_rounds' for model.kind: image"):
        load_config(overrides=["model.self_train_rounds=2"])
    cfg = load_config(overrides=["model.kind=feature", "model.self_train_rounds=2"])
    assert cfg.model.self_train_rounds == 2 and cfg.model.self_train_threshold == 0.9
