"""The algorithm interface: outputs and losses only; the training loop owns optimisation.

`forward(batch, progress)` takes a dict with `x` (labelled images, normalised), `y` (0/1 labels),
`domain` (domain index of each labelled image) and, for algorithms with `uses_target`, `x_target`
and `domain_target` (unlabelled images of the held-out and test centers). It returns a dict with
`loss` (what the loop backpropagates), `logits` of the labelled images, and scalar logs.
`progress` is step / total_steps in [0, 1] for schedules.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..models.backbone import PatchClassifier


class Algorithm(nn.Module):
    uses_target = False  # whether the loop must feed unlabelled target-center batches

    def __init__(self, model: PatchClassifier, n_domains: int, cfg: Config):
        super().__init__()
        self.model = model
        self.n_domains = n_domains
        self.cfg = cfg

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float())

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        return [
            {"params": list(self.model.backbone.parameters()), "lr": o.backbone_lr, "name": "backbone"},
            {"params": list(self.model.head.parameters()), "lr": o.lr, "name": "head"},
        ]

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        raise NotImplementedError
