"""A head on stored features (the feature task's model): linear probe or MLP, one tumour logit;
`forward` returns named outputs like the image model's, so the algorithms serve both."""
from __future__ import annotations

import torch
from torch import nn

from ..config import FeatureModelCfg
from .feature_shift import FeatureShift


class FeatureClassifier(nn.Module):
    """A head on stored features: `shift` (the adaptable map in front, identity unless model.feature_shift),
    then `backbone`, identity (linear probe) or a hidden MLP layer, then `head`; or (model.head paper_dann)
    the published Phikon-v2 + DANN head's feature extractor and classifier."""

    def __init__(self, dim: int, cfg: FeatureModelCfg):
        super().__init__()
        self.shift = FeatureShift(dim, cfg.feature_shift, cfg.coral_ridge)
        if cfg.head == "paper_dann":  # Benbalit & Mondelice (Phikon-v2 + DANN head, 0.97627), as they describe it
            half = dim // 2  # feature extractor: LayerNorm, linear to half the width, ReLU (the domain head's input)
            self.backbone = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, half), nn.ReLU())
            self.num_features = half  # classifier: two linear layers, hidden 100, ReLU, dropout 0.4
            self.head = nn.Sequential(nn.Linear(half, 100), nn.ReLU(), nn.Dropout(0.4), nn.Linear(100, 1))
            self.l1 = 0.0
            return
        if cfg.head_hidden > 0:
            self.backbone = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.drop_rate))
            self.num_features = cfg.head_hidden
        else:
            self.backbone = nn.Identity()
            self.num_features = dim
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(self.num_features, 1))
        self.l1 = cfg.head_l1

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The L1 part of a sparse probe as a proximal step, w <- sign(w) max(|w| - t, 0) (plain gradient steps
        never make a weight exactly zero). t = lr * l1 for SGD; under Adam(W) the step is preconditioned per
        weight by 1 / (sqrt(v_hat) + eps), so the prox in that metric is t = lr * l1 / (sqrt(v_hat) + eps):
        a dimension stays only while its loss gradient outweighs l1, the L1 optimality condition."""
        if self.l1 <= 0:
            return
        weight = self.head[-1].weight
        group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        state = optimizer.state.get(weight, {})
        threshold = group["lr"] * self.l1
        if "exp_avg_sq" in state:
            beta2, step = group["betas"][1], float(state["step"])
            threshold = threshold / ((state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + group["eps"])
        weight.copy_(weight.sign() * (weight.abs() - threshold).clamp_min(0))

    def sparsity(self) -> dict:
        """For a sparse probe: the input dimensions it keeps (non-zero weights) out of how many."""
        if self.l1 <= 0:
            return {}
        weight = self.head[-1].weight.detach().flatten()
        return {"kept_dims": torch.nonzero(weight).flatten().tolist(), "dims": len(weight)}

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Tumour logits of inputs already through the shift (self-training trains these layers only)."""
        return self.head(self.backbone(z)).squeeze(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(self.shift(x))
        return {"features": features, "logits": self.head(features).squeeze(1)}
