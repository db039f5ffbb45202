"""Empirical risk minimisation: the classification loss on the labelled centers, nothing else."""
from __future__ import annotations

from .base import Algorithm


class ERM(Algorithm):
    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        logits = self.model(batch["x"])["logits"]
        loss = self.classification_loss(logits, batch["y"])
        return {"loss": loss, "logits": logits, "cls_loss": loss.detach()}
