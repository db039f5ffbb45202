"""The algorithm interface: outputs and losses only; the training loop owns optimisation.

`extend_batch(batch, to_model)` runs before each forward and may add inputs the algorithm needs (the
Stain-AgLr switches add HED-altered copies of `batch["images"]`, the step's augmented images before
the model's preprocessing). `forward(batch, progress)` takes a dict with `x` (labelled images, normalised), `y` (0/1
labels),
`domain` (domain index of each labelled image) and, when `uses_target`, `x_target` and
`domain_target` (unlabelled images of the held-out and test centers); when `uses_altered`, also
`x_altered` (every image of x and x_target again, with HED stain alteration) and, for the
regeneration loss, `regen_target` (those images average-pooled to `algorithm.regen_size`). It
returns a dict with `loss` (what the loop backpropagates), `logits` of the labelled images, and
scalar logs. `progress` is step / total_steps in [0, 1] for schedules.

Stain-AgLr (Stain-Agnostic Learning, DART 2022) is two switches every algorithm inherits:
consistency regularisation (`algorithm.consistency_weight`: KL between the predictions for an image
and for its altered copy) and stain regeneration (`algorithm.regen_weight`: a small decoder rebuilds
the image from the altered copy's features). The decoder is part of the algorithm, not of the model:
it is trained and dropped, never saved with the checkpoint.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..stain.hed import random_hed
from .losses import binary_entropy, consistency_loss, focal_bce, regeneration_loss


class RegenDecoder(nn.Module):
    """Pooled features (B x D) -> an image B x 3 x S x S in [0, 1]: a linear map to `width` x 4 x 4,
    then (nearest upsampling x2, 3x3 conv, ReLU) until S, and a 1x1 conv to RGB."""

    def __init__(self, dim: int, size: int, width: int = 64):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(dim, width * 16)
        steps = []
        side = 4
        while side < size:
            steps += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
            side *= 2
        self.body = nn.Sequential(*steps)
        self.rgb = nn.Conv2d(width, 3, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.fc(features.float()).view(-1, self.width, 4, 4)
        return torch.sigmoid(self.rgb(self.body(x)))


class Algorithm(nn.Module):

    def __init__(self, model: nn.Module, n_domains: int, cfg: Config):
        super().__init__()
        self.model = model
        self.n_domains = n_domains
        self.cfg = cfg
        a = cfg.algorithm
        self.decoder = RegenDecoder(model.num_features, a.regen_size) if a.regen_weight > 0 else None
        if a.class_reweight:  # filled by observe(): the fold's per-(center, class) weights
            self.register_buffer("class_weights", torch.ones(n_domains, 2))
        if a.domain_reweight:
            self.register_buffer("domain_weights", torch.ones(n_domains))

    @torch.no_grad()
    def observe(self, source, target, domains: dict[int, int]) -> None:
        """The fold's data counts for the reweighting switches (before training):
        class_reweight   every labelled center's two classes weigh the same, its total unchanged:
                         w(center, class) = n_center / (2 n_center,class) (sample reweighting for class
                         imbalance, as DMAN does per domain)
        domain_reweight  the domain loss weighs every center inversely to its share of the data the domain
                         head sees: w(center) = N / (K n_center), K centers present (labelled + unlabelled)"""
        a = self.cfg.algorithm
        if a.class_reweight:
            for center, part in source.groupby("center"):
                counts = part["label"].value_counts()
                for y in (0, 1):
                    if counts.get(y, 0):
                        self.class_weights[domains[int(center)], y] = len(part) / (2 * counts[y])
        if a.domain_reweight:
            seen = pd.concat([source["center"], target["center"]]).value_counts()
            for center, n in seen.items():
                self.domain_weights[domains[int(center)]] = seen.sum() / (len(seen) * n)
    embeds_each_epoch = False  # True: the loop calls before_epoch(batches, gather, seed) before each epoch (AIVA)

    @property
    def uses_target(self) -> bool:
        """Whether the loop must feed unlabelled target-center batches."""
        return self.cfg.algorithm.entropy_weight > 0

    @property
    def uses_altered(self) -> bool:
        """Whether the loop must feed HED-altered copies of the images (Stain-AgLr switches)."""
        a = self.cfg.algorithm
        return a.consistency_weight > 0 or a.regen_weight > 0

    def extend_batch(self, batch: dict, to_model) -> dict:
        """Stain-AgLr inputs: every image of the step again, HED-altered (model-ready), and for the
        regeneration loss the images average-pooled to the decoder's side."""
        if self.uses_altered:
            a, images = self.cfg.algorithm, batch["images"]
            batch["x_altered"] = to_model(random_hed(images, a.alter_sigma))
            if a.regen_weight > 0:
                batch["regen_target"] = F.adaptive_avg_pool2d(images, a.regen_size)
        return batch

    def classification_loss(
        self, logits: torch.Tensor, y: torch.Tensor, domain: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = (
            self.class_weights[domain, y.long()] if self.cfg.algorithm.class_reweight and domain is not None else None
        )
        return focal_bce(logits, y, self.cfg.algorithm.focal_gamma, weight)

    def shared_forward(self, batch: dict) -> tuple[dict, int, int]:
        """One forward over labelled, (when used) unlabelled and (when used) altered images: batch-norm
        statistics see every center. Returns the model outputs, the number n of labelled images first
        in them and the number m of unaltered images (labelled + unlabelled; the altered copies follow)."""
        parts = [batch["x"]] + ([batch["x_target"]] if self.uses_target else [])
        n, m = len(batch["x"]), sum(len(p) for p in parts)
        if self.uses_altered:
            parts.append(batch["x_altered"])
        return self.model(torch.cat(parts) if len(parts) > 1 else parts[0]), n, m

    def with_stain_losses(self, result: dict, out: dict, m: int, batch: dict) -> dict:
        """Stain-AgLr: consistency and regeneration terms on the altered copies (out[m:])."""
        a = self.cfg.algorithm
        if a.consistency_weight > 0:
            cons = consistency_loss(out["logits"][:m], out["logits"][m:])
            result["loss"] = result["loss"] + a.consistency_weight * cons
            result["cons_loss"] = cons.detach()
        if self.decoder is not None:
            regen = regeneration_loss(self.decoder(out["features"][m:]), batch["regen_target"])
            result["loss"] = result["loss"] + a.regen_weight * regen
            result["regen_loss"] = regen.detach()
        return result

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
        groups = [
            {"params": [p for p in self.model.backbone.parameters() if p.requires_grad], "lr": o.backbone_lr,
             "name": "backbone"},
            {"params": list(self.model.head.parameters()), "lr": o.lr, "name": "head"},
        ]
        if self.decoder is not None:
            groups.append({"params": list(self.decoder.parameters()), "lr": o.lr, "name": "decoder"})
        return groups

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        raise NotImplementedError
