"""The algorithm interface: outputs and losses only; the training loop owns optimisation.

`forward(batch, progress)` takes a dict with `x` (labelled images, normalised), `y` (0/1 labels),
`domain` (domain index of each labelled image) and, when `uses_target`, `x_target` and
`domain_target` (unlabelled images of the held-out and test centers). It returns a dict with
`loss` (what the loop backpropagates), `logits` of the labelled images, and scalar logs.
`progress` is step / total_steps in [0, 1] for schedules.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..models.backbone import PatchClassifier
from .losses import binary_entropy, focal_bce


class Algorithm(nn.Module):

    def __init__(self, model: PatchClassifier, n_domains: int, cfg: Config):
        super().__init__()
        self.model = model
        self.n_domains = n_domains
        self.cfg = cfg

    @property
    def uses_target(self) -> bool:
        """Whether the loop must feed unlabelled target-center batches."""
        return self.cfg.algorithm.entropy_weight > 0

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return focal_bce(logits, y, self.cfg.algorithm.focal_gamma)

    def shared_forward(self, batch: dict) -> tuple[dict, int]:
        """One forward over labelled and (when used) unlabelled images: batch-norm statistics see
        every center. Returns the model outputs and the number of labelled images first in them."""
        n = batch["x"].shape[0]
        x = torch.cat([batch["x"], batch["x_target"]]) if self.uses_target else batch["x"]
        return self.model(x), n

    def with_entropy(self, result: dict, target_logits: torch.Tensor) -> dict:
        """Entropy minimisation on the unlabelled target centers (`algorithm.entropy_weight`)."""
        w = self.cfg.algorithm.entropy_weight
        if w > 0:
            ent = binary_entropy(target_logits)
            result["loss"] = result["loss"] + w * ent
            result["ent_loss"] = ent.detach()
        return result

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        return [
            {"params": [p for p in self.model.backbone.parameters() if p.requires_grad], "lr": o.backbone_lr,
             "name": "backbone"},
            {"params": list(self.model.head.parameters()), "lr": o.lr, "name": "head"},
        ]

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        raise NotImplementedError
