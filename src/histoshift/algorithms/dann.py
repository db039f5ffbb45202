"""DANN (Ganin et al. 2016): a domain head learns the center of every image through a gradient
reversal layer, so the backbone is pushed towards features that do not tell centers apart.

The domain head sees the labelled training centers and, without their labels, the held-out center
and the test center (the held-out fold plays the role the test center plays at submission). The
reversal coefficient follows Ganin's schedule 2 / (1 + exp(-10 p)) - 1 for p = step / total steps,
scaled by `algorithm.grl_max`; the head has its own learning rate (`optim.domain_lr`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Algorithm
from .losses import domain_loss


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -coeff on the way back."""
    return _GradReverse.apply(x, coeff)


def ganin_coefficient(progress: float, max_value: float = 1.0) -> float:
    p = min(max(progress, 0.0), 1.0)
    return max_value * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


class DANN(Algorithm):
    uses_target = True

    def __init__(self, model, n_domains, cfg):
        super().__init__(model, n_domains, cfg)
        hidden = cfg.algorithm.domain_hidden
        if cfg.algorithm.domain_batchnorm:  # the Phikon-v2 + DANN head recipe: linear, batch norm, ReLU, linear
            middle = [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        else:
            middle = [nn.ReLU(inplace=True), nn.Dropout(0.1)]
        self.domain_head = nn.Sequential(nn.Linear(model.num_features, hidden), *middle, nn.Linear(hidden, n_domains))

    def param_groups(self) -> list[dict]:
        return super().param_groups() + [
            {"params": list(self.domain_head.parameters()), "lr": self.cfg.optim.domain_lr, "name": "domain_head"}
        ]

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        out, n_src, m = self.shared_forward(batch)
        logits = out["logits"][:n_src]
        cls_loss = self.classification_loss(logits, batch["y"], batch["domain"])
        coeff = ganin_coefficient(progress, self.cfg.algorithm.grl_max)
        dom_logits = self.domain_head(grad_reverse(out["features"][:m], coeff))
        domains = torch.cat([batch["domain"], batch["domain_target"]])
        dom_loss = domain_loss(dom_logits, domains, self.cfg.algorithm.domain_loss,
                               self.domain_weights if self.cfg.algorithm.domain_reweight else None)
        loss = cls_loss + self.cfg.algorithm.domain_weight * dom_loss
        dom_acc = (dom_logits.argmax(1) == domains).float().mean()
        result = {"loss": loss, "logits": logits, "cls_loss": cls_loss.detach(), "dom_loss": dom_loss.detach(),
                  "dom_acc": dom_acc.detach(), "grl": torch.tensor(coeff)}
        return self.with_stain_losses(self.with_entropy(result, out["logits"][n_src:m]), out, m, batch)
