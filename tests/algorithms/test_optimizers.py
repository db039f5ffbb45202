"""optim.name: the optimizers people expect, from maintained libraries (timm's factory, pytorch-optimizer for
Nero and AvaGrad), each parameter group keeping its own learning rate; a name neither knows is one line."""
from __future__ import annotations

import pytest
import torch

from histoshift.config import ConfigError, load_config
from histoshift.engine import build_optimizer


def _groups():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    return a, b, [{"params": list(a.parameters()), "lr": 0.05, "name": "backbone"},
                  {"params": list(b.parameters()), "lr": 0.01, "name": "head"}]


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("sgd", "SGD"), ("lamb", "Lamb"), ("nero", "Nero"),
                                       ("lion", "Lion"), ("avagrad", "AvaGrad")])
def test_each_optimizer_keeps_the_groups_and_descends(name, cls):
    # without weight decay, so that only the gradient can move the weights (AvaGrad's first step is zero by design:
    # its step size uses the previous step's second moment; a decayed step would pass for a gradient step)
    a, b, groups = _groups()
    opt = build_optimizer(load_config(overrides=[f"optim.name={name}", "optim.weight_decay=0"]).optim, groups)
    assert type(opt).__name__ == cls
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01]
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    x = torch.randn(16, 4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = b(torch.relu(a(x))).pow(2).mean()
        losses.append(float(loss))
        loss.backward()
        opt.step()
    assert all(not torch.equal(p0, p) for p0, p in zip(before, (*a.parameters(), *b.parameters())))
    assert float(b(torch.relu(a(x))).pow(2).mean()) < losses[0], losses  # downhill, by the gradient alone


def test_adamw_is_torchs_with_the_defaults_it_had():
    _, _, groups = _groups()
    opt = build_optimizer(load_config().optim, groups)
    assert (
        type(opt) is torch.optim.AdamW
        and opt.defaults["weight_decay"] == 0.01
        and opt.defaults["betas"] == (0.9, 0.999)
    )


def test_avagrad_takes_the_configs_decoupled_weight_decay():
    _, _, groups = _groups()
    opt = build_optimizer(load_config(overrides=["optim.name=avagrad", "optim.weight_decay=0.05"]).optim, groups)
    assert opt.defaults["weight_decay"] == 0.05 and opt.defaults["weight_decouple"] is True


def test_an_unknown_optimizer_is_one_line():
    with pytest.raises(ConfigError, match="optim.name: unknown optimizer 'adamx' \\(known: .*nero"):
        load_config(overrides=["optim.name=adamx"])
