"""Gradient reversal, the Ganin schedule, and every registered algorithm on a tiny batch."""
from __future__ import annotations

import math

import pytest
import torch

from histoshift.algorithms import ALGORITHMS
from histoshift.algorithms.dann import ganin_coefficient, grad_reverse
from histoshift.config import Config
from histoshift.models.backbone import PatchClassifier


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_grad_reverse_flips_sign_and_scales(coeff):
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(4, 5)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)  # identity forward
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -coeff * w)


def test_ganin_schedule_values():
    assert ganin_coefficient(0.0) == 0.0
    assert ganin_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert ganin_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert ganin_coefficient(0.1) == pytest.approx(0.46211715726)
    assert ganin_coefficient(0.5, max_value=0.5) == pytest.approx(0.5 * (2 / (1 + math.exp(-5)) - 1))
    values = [ganin_coefficient(p / 10) for p in range(11)]
    assert values == sorted(values) and values[-1] < 1.0
    assert ganin_coefficient(-1) == 0.0 and ganin_coefficient(2) == ganin_coefficient(1)


def _cfg(name):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.input_size = "test_efficientnet", "none", 64
    cfg.algorithm.name = name
    return cfg


def _batch(n=6, m=4):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 3, 64, 64, generator=g), "y": torch.tensor([0, 1] * (n // 2)).float(),
            "domain": torch.tensor([0, 1, 2] * (n // 3)), "x_target": torch.randn(m, 3, 64, 64, generator=g),
            "domain_target": torch.tensor([3, 4] * (m // 2))}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_a_few_steps(name):
    torch.manual_seed(0)
    cfg = _cfg(name)
    algo = ALGORITHMS[name](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    groups = algo.param_groups()
    assert sum(len(g["params"]) for g in groups) == len(list(algo.parameters()))
    opt = torch.optim.AdamW(groups)
    batch = _batch()
    losses = []
    for step in range(3):
        out = algo(batch, progress=step / 3)
        assert out["logits"].shape == (6,) and torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]
    algo.eval()
    with torch.no_grad():
        assert algo.model(batch["x"])["logits"].shape == (6,)


def test_dann_domain_head_gets_its_own_lr_and_reversed_gradient():
    torch.manual_seed(0)
    cfg = _cfg("dann")
    cfg.optim.domain_lr = 0.123
    algo = ALGORITHMS["dann"](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    assert {g["name"]: g["lr"] for g in algo.param_groups()}["domain_head"] == 0.123
    batch = _batch()
    algo.eval()  # no dropout / batch-norm updates: the two passes see the same function
    feats = algo.model.backbone(torch.cat([batch["x"], batch["x_target"]])).detach().requires_grad_(True)
    domains = torch.cat([batch["domain"], batch["domain_target"]])
    loss = torch.nn.functional.cross_entropy(algo.domain_head(grad_reverse(feats, 0.7)), domains)
    (g_rev,) = torch.autograd.grad(loss, feats)
    loss = torch.nn.functional.cross_entropy(algo.domain_head(feats), domains)
    (g_plain,) = torch.autograd.grad(loss, feats)
    torch.testing.assert_close(g_rev, -0.7 * g_plain)
    out = algo(batch, progress=0.5)
    assert float(out["grl"]) == pytest.approx(ganin_coefficient(0.5))
    assert float(out["loss"].detach()) == pytest.approx(float(out["cls_loss"] + cfg.algorithm.domain_weight * out["dom_loss"]), rel=1e-5)


def test_focal_loss_values():
    from histoshift.algorithms.losses import focal_bce

    logits, y = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    torch.testing.assert_close(focal_bce(logits, y, 0.0), bce.mean())
    p_t = torch.tensor([torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0)), 0.5])
    torch.testing.assert_close(focal_bce(logits, y, 2.0), ((1 - p_t) ** 2 * bce).mean())
    assert focal_bce(logits, y, 2.0) < focal_bce(logits, y, 0.0)  # easy examples are down-weighted


def test_entropy_and_least_squares_domain_loss():
    from histoshift.algorithms.losses import binary_entropy, domain_loss

    assert float(binary_entropy(torch.zeros(4))) == pytest.approx(math.log(2))
    assert float(binary_entropy(torch.tensor([20.0, -20.0]))) < 1e-6
    logits, d = torch.tensor([[10.0, -10.0], [0.0, 0.0]]), torch.tensor([0, 1])
    assert float(domain_loss(logits, d, "ls")) == pytest.approx(0.25)  # rows: 0 (perfect) and 0.25 + 0.25 (uniform)
    torch.testing.assert_close(domain_loss(logits, d, "ce"), torch.nn.functional.cross_entropy(logits, d))
    with pytest.raises(ValueError, match="unknown domain loss"):
        domain_loss(logits, d, "wasserstein")


@pytest.mark.parametrize("name, overrides", [
    ("erm", {"entropy_weight": 0.5}), ("erm", {"focal_gamma": 2.0}),
    ("dann", {"domain_loss": "ls"}), ("dann", {"entropy_weight": 0.3, "focal_gamma": 1.0}),
])
def test_loss_switches(name, overrides):
    torch.manual_seed(0)
    cfg = _cfg(name)
    for k, v in overrides.items():
        setattr(cfg.algorithm, k, v)
    algo = ALGORITHMS[name](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    assert algo.uses_target == (name == "dann" or overrides.get("entropy_weight", 0) > 0)
    out = algo(_batch(), progress=0.3)
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (6,)
    if overrides.get("entropy_weight"):
        extra = out["loss"] - out["cls_loss"] - (cfg.algorithm.domain_weight * out["dom_loss"] if name == "dann" else 0)
        assert float(extra.detach()) == pytest.approx(overrides["entropy_weight"] * float(out["ent_loss"]), rel=1e-4)
    out["loss"].backward()
