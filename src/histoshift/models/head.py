"""A head on stored features (the feature task's model): linear probe or MLP, one tumour logit;
`forward` returns named outputs like the image model's, so the algorithms serve both."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelCfg
from .feature_shift import FeatureShift


class FeatureClassifier(nn.Module):
    """A head on stored features: `shift` (the adaptable map in front, identity unless model.feature_shift),
    then `backbone`, identity (linear probe) or a hidden MLP layer."""

    def __init__(self, dim: int, cfg: ModelCfg):
        super().__init__()
        self.shift = FeatureShift(dim, cfg.feature_shift, cfg.coral_ridge)
        if cfg.head_hidden > 0:
            self.backbone = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.drop_rate))
            self.num_features = cfg.head_hidden
        else:
            self.backbone = nn.Identity()
            self.num_features = dim
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(self.num_features, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(self.shift(x))
        return {"features": features, "logits": self.head(features).squeeze(1)}
