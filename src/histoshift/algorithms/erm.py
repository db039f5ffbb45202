"""Empirical risk minimisation: the classification loss on the labelled centers (plus, when
`algorithm.entropy_weight` > 0, entropy minimisation on the unlabelled target centers)."""
from __future__ import annotations

from .base import Algorithm


class ERM(Algorithm):
    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        out, n, m = self.shared_forward(batch)
        logits = out["logits"][:n]
        loss = self.classification_loss(logits, batch["y"], batch["domain"])
        result = self.with_entropy({"loss": loss, "logits": logits, "cls_loss": loss.detach()}, out["logits"][n:m])
        return self.with_stain_losses(result, out, m, batch)
