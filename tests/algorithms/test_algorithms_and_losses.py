"""Gradient reversal, the Ganin schedule, and every registered algorithm on a tiny batch."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from histoshift.algorithms import ALGORITHMS
from histoshift.algorithms.dann import ganin_coefficient, grad_reverse
from histoshift.config import Config
from histoshift.models.backbone import PatchClassifier

from helpers import tiny_config


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
    if algo.embeds_each_epoch:  # AIVA: its clusters before the first step
        algo.before_epoch([batch], lambda t: t, seed=0)
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
    assert float(out["loss"].detach()) == pytest.approx(
        float(out["cls_loss"] + cfg.algorithm.domain_weight * out["dom_loss"]), rel=1e-5
    )


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


def test_stain_aglr_loss_values_on_hand_made_inputs():
    from histoshift.algorithms.losses import bernoulli_kl, consistency_loss, regeneration_loss

    p, q = 0.8, 0.6
    want = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    logit = lambda v: math.log(v / (1 - v))  # noqa: E731
    assert float(bernoulli_kl(torch.tensor([logit(p)]), torch.tensor([logit(q)]))) == pytest.approx(want, rel=1e-5)
    assert float(bernoulli_kl(torch.tensor([3.0, -2.0]), torch.tensor([3.0, -2.0]))) == pytest.approx(0, abs=1e-7)
    assert float(bernoulli_kl(torch.tensor([60.0]), torch.tensor([-60.0]))) == pytest.approx(
        60, rel=1e-3
    )  # stable: log(1/q)
    ref, alt = torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([0.0, 0.5], requires_grad=True)
    consistency_loss(ref, alt).backward()
    assert ref.grad is None and alt.grad.abs().sum() > 0  # the image's own prediction is the target
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert float(regeneration_loss(a, b)) == pytest.approx(0.25)


def _stain_batch(cfg, algo):
    batch = _batch()
    plain = torch.cat([batch["x"], batch["x_target"]]) if algo.uses_target else batch["x"]
    g = torch.Generator().manual_seed(1)
    batch["x_altered"] = plain + 0.1 * torch.randn(plain.shape, generator=g)
    batch["regen_target"] = torch.rand(len(plain), 3, cfg.algorithm.regen_size, cfg.algorithm.regen_size, generator=g)
    return batch


@pytest.mark.parametrize("name", ["erm", "dann"])
def test_stain_aglr_switches_add_their_losses_and_reach_the_backbone(name):
    torch.manual_seed(0)
    cfg = _cfg(name)
    cfg.algorithm.consistency_weight, cfg.algorithm.regen_weight, cfg.algorithm.regen_size = 10.0, 0.1, 16
    algo = ALGORITHMS[name](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    assert algo.uses_altered and {g["name"] for g in algo.param_groups()} >= {"decoder"}
    out = algo(_stain_batch(cfg, algo), progress=0.3)
    rest = out["cls_loss"] + (cfg.algorithm.domain_weight * out["dom_loss"] if name == "dann" else 0)
    extra = 10.0 * out["cons_loss"] + 0.1 * out["regen_loss"]
    assert float((out["loss"] - rest).detach()) == pytest.approx(float(extra), rel=1e-4)
    # each auxiliary loss alone sends gradient into the backbone (through the altered copies)
    from histoshift.algorithms.losses import consistency_loss, regeneration_loss

    batch = _stain_batch(cfg, algo)
    o, n, m = algo.shared_forward(batch)
    for aux in (consistency_loss(o["logits"][:m], o["logits"][m:]),
                regeneration_loss(algo.decoder(o["features"][m:]), batch["regen_target"])):
        algo.zero_grad()
        aux.backward(retain_graph=True)
        grads = [p.grad.abs().sum() for p in algo.model.backbone.parameters() if p.grad is not None]
        assert grads and float(sum(grads)) > 0


@pytest.mark.slow
def test_stain_aglr_decoder_is_not_saved_with_the_model(prepared_root, tmp_path):
    """A run trained with both switches saves the classifier only; infer loads it as any run."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from accelerate import Accelerator

    from histoshift.cli import main
    from histoshift.data.cache import Cache
    from histoshift.paths import Paths
    from histoshift.runs import find_runs
    from histoshift.tasks import run_task

    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tiny_config(algorithm={"name": "dann", "consistency_weight": 1.0, "regen_weight": 0.1, "regen_size": 16})
    (tmp_path / "aglr.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--root", str(root), "train", "--config", str(tmp_path / "aglr.yaml"), "--fold", "0"]) == 0
    (run,) = find_runs(root / "work" / "runs")
    keys = load_file(str(run.checkpoint)).keys()
    assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)
    first = [json.loads(line) for line in run.metrics.read_text().splitlines()][0]
    assert first["train_cons_loss"] >= 0 and first["train_regen_loss"] > 0
    _, model = run_task(run, Cache.open(root / "work" / "cache"), Paths(root), Accelerator())
    assert not any("decoder" in name for name, _ in model.named_modules())
    assert main(["--root", str(root), "infer"]) == 0


def test_stain_aglr_needs_a_fine_tuned_backbone():
    from histoshift.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="need a fine-tuned backbone"):
        load_config(None, ["model.kind=feature", "algorithm.consistency_weight=1"])
    with pytest.raises(ConfigError, match="algorithm.regen_size: expected 8, 16, 32 or 64"):
        load_config(None, ["algorithm.regen_size=20"])


def test_config_knows_the_registered_algorithms():
    """config.py names the algorithms without importing the registry; the two lists must agree."""
    from histoshift.config import ALGORITHM_NAMES

    assert set(ALGORITHM_NAMES) == set(ALGORITHMS)


def test_reweighting_switches_match_a_hand_computation():
    import pandas as pd

    from histoshift.algorithms.losses import domain_loss, focal_bce

    cfg = Config.model_validate(
        tiny_config(algorithm={"name": "dann", "class_reweight": True, "domain_reweight": True})
    )
    algo = ALGORITHMS["dann"](PatchClassifier(cfg.model, load_weights=False), 3, cfg)
    # center 0: 3 normal, 1 tumour; center 3: 2 and 2; targets: 8 patches of center 1 (twice a labelled center)
    source = pd.DataFrame({"center": [0, 0, 0, 0, 3, 3, 3, 3], "label": [0, 0, 0, 1, 0, 0, 1, 1]})
    target = pd.DataFrame({"center": [1] * 8})
    assert torch.equal(algo.domain_weights, torch.ones(3))  # before observe(): the buffer's initial value
    algo.observe(source, target, {0: 0, 1: 1, 3: 2})
    torch.testing.assert_close(algo.class_weights, torch.tensor([[4 / 6, 4 / 2], [1.0, 1.0], [1.0, 1.0]]))
    # N = 16 patches over K = 3 centers: w = N / (K n) -> 16/12 for the labelled ones, 16/24 for the target
    torch.testing.assert_close(algo.domain_weights, torch.tensor([16 / 12, 16 / 24, 16 / 12]))
    logits, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([2.0, 1.0, 0.5])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    torch.testing.assert_close(focal_bce(logits, y, 0.0, w), (w * bce).sum() / w.sum())
    dom_logits, doms = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    dw = torch.tensor([0.5, 2.0, 1.0])
    ce = torch.nn.functional.cross_entropy(dom_logits, doms, reduction="none")
    torch.testing.assert_close(domain_loss(dom_logits, doms, "ce", dw), (dw[doms] * ce).sum() / dw[doms].sum())
    plain = ALGORITHMS["dann"](PatchClassifier(cfg.model, load_weights=False), 3,
                               Config.model_validate({**cfg.to_dict(), "algorithm": {"name": "dann"}}))
    assert not hasattr(plain, "class_weights")  # off: the default state dict is unchanged


def test_confusion_and_negative_entropy_against_a_hand_computation():
    from histoshift.algorithms.losses import confusion_loss, negative_entropy

    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]])
    p = torch.softmax(logits, 1)
    k = 3
    assert float(confusion_loss(logits[:1])) == pytest.approx(math.log(k))  # uniform: log K, the minimum
    assert float(negative_entropy(logits[:1])) == pytest.approx(-math.log(k))  # uniform: -log K, the minimum
    row = p[1]
    hand_conf = -sum(math.log(float(q)) for q in row) / k
    hand_negent = sum(float(q) * math.log(float(q)) for q in row)
    assert float(confusion_loss(logits[1:])) == pytest.approx(hand_conf, rel=1e-6)
    assert float(negative_entropy(logits[1:])) == pytest.approx(hand_negent, rel=1e-6)
    kl = sum(math.log(1 / k / float(q)) / k for q in row)  # KL(uniform || p)
    assert float(confusion_loss(logits[1:])) == pytest.approx(math.log(k) + kl, rel=1e-6)
    assert float(confusion_loss(logits)) == pytest.approx((math.log(k) + hand_conf) / 2, rel=1e-6)


def _debias_grads(name, domain_weight, debias_weight):
    torch.manual_seed(0)
    cfg = _cfg(name)
    cfg.algorithm.domain_weight, cfg.algorithm.debias_weight = domain_weight, debias_weight
    algo = ALGORITHMS[name](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    algo.eval()  # no dropout, batch norm as is: every pass the same function
    out = algo(_batch(), progress=0.5)
    out["loss"].backward()
    head = torch.cat([p.grad.flatten() for p in algo.domain_head.parameters()])
    backbone = torch.cat([p.grad.flatten() for p in algo.model.backbone.parameters() if p.grad is not None])
    return out, head, backbone


@pytest.mark.parametrize("name, reverse, key", [("lntl", True, "negent_loss"), ("tabe", False, "conf_loss"),
                                                ("clgr", True, "conf_loss")])
def test_debiasing_heads_confine_each_gradient_to_its_parameters(name, reverse, key):
    """The debiasing term never moves the bias head; the bias head's own loss reaches the backbone only through
    gradient reversal (lntl, clgr), never in tabe; the total is the weighted sum of the logged terms."""
    out, head, backbone = _debias_grads(name, 0.5, 1.0)
    assert float(out["loss"].detach()) == pytest.approx(
        float(out["cls_loss"] + 0.5 * out["dom_loss"] + out[key]), rel=1e-5
    )
    _, head_no_debias, backbone_no_debias = _debias_grads(name, 0.5, 0.0)
    torch.testing.assert_close(head, head_no_debias)  # the term goes through the head with its parameters fixed
    assert not torch.allclose(backbone, backbone_no_debias)  # ... and reaches the backbone
    _, head_no_bias, backbone_no_bias = _debias_grads(name, 0.0, 1.0)
    assert head_no_bias.abs().max() == 0  # the head learns from its own cross entropy alone
    assert torch.allclose(backbone, backbone_no_bias) != reverse  # tabe: the head's loss never reaches the backbone
    if name == "lntl":
        assert float(out[key]) >= -math.log(5) - 1e-6 and float(out[key]) <= 0
    else:
        assert float(out[key]) >= math.log(5) - 1e-6


def test_hungarian_matching_recovers_a_known_permutation():
    from histoshift.algorithms.aiva import match_clusters

    rng = np.random.default_rng(0)
    source = rng.normal(size=(6, 4)) * 5
    perm = np.array([3, 0, 5, 1, 4, 2])
    target = source[perm] + rng.normal(size=(6, 4)) * 0.1  # target cluster i is source cluster perm[i], shifted
    assert match_clusters(target, source).tolist() == perm.tolist()
    # the least total distance, not each row's nearest: two targets near one source share it greedily, not here
    assert match_clusters(np.array([[0.0], [0.4]]), np.array([[0.1], [10.0]])).tolist() == [0, 1]
    assert match_clusters(np.array([[0.0], [0.4]]), np.array([[0.5], [-10.0]])).tolist() == [1, 0]


def test_alignment_loss_against_a_hand_computation():
    from histoshift.algorithms.aiva import alignment_loss

    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    matched = torch.tensor([[1.0, 1.0], [9.0, 0.0], [5.0, 5.0]])
    z = torch.tensor([[0.5, 0.0], [-0.5, 1.0], [11.0, 0.0]], requires_grad=True)  # clusters 0, 0, 1; none in 2
    loss = alignment_loss(z, centers, matched)
    hand = (((0.0 - 1) ** 2 + (0.5 - 1) ** 2) + ((11.0 - 9) ** 2 + 0.0)) / 2
    assert float(loss.detach()) == pytest.approx(hand)
    loss.backward()
    torch.testing.assert_close(z.grad[2], torch.tensor([2.0 * 2 / 2, 0.0]))  # d/dz of (z - m)^2 / 2 clusters


@pytest.mark.parametrize("name", ["aiva", "dann_aiva"])
def test_aiva_clusters_once_an_epoch_and_pulls_target_clusters(name):
    """before_epoch projects, clusters and matches; the step's loss adds aiva_weight x the alignment term, which
    moves the backbone; the clusters are a function of the weights, the batches and the seed."""
    torch.manual_seed(0)
    cfg = _cfg(name)
    cfg.algorithm.aiva_clusters, cfg.algorithm.aiva_dims, cfg.algorithm.aiva_weight = 2, 3, 0.5
    algo = ALGORITHMS[name](PatchClassifier(cfg.model, load_weights=False), 5, cfg)
    batch = _batch(12, 8)
    with pytest.raises(RuntimeError, match="before_epoch"):
        algo(batch)
    algo.before_epoch([batch], lambda t: t, seed=3)
    target, matched = algo.aiva_target.clone(), algo.aiva_matched.clone()
    assert target.shape == (2, 3) and not torch.equal(target, matched)
    algo.before_epoch([batch], lambda t: t, seed=3)
    torch.testing.assert_close(algo.aiva_target, target)  # the same again
    algo.eval()
    out = algo(batch, progress=0.5)
    base = out["cls_loss"] + (cfg.algorithm.domain_weight * out["dom_loss"] if name == "dann_aiva" else 0)
    assert float(out["loss"].detach()) == pytest.approx(float(base + 0.5 * out["aiva_loss"]), rel=1e-5)
    assert float(out["aiva_loss"]) > 0
    state = algo.state_dict()
    assert "aiva_basis" in state and "aiva_basis" not in algo.model.state_dict()  # never in the saved model
