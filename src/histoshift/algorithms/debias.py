"""Debiasing heads against the center: "Learning Not to Learn", "Turning a Blind Eye" and its gradient-reversal
variant, as Bevan & Atapour-Abarghouei compared them (DART 2022, pp. 1-11; their bias was skin tone, here it is
the center). A bias head - DANN's domain head: same width, learning rate and Ganin schedule - predicts the center
of every image of a step, labelled and unlabelled (DANN's inputs), and the backbone is taught not to let it:

  lntl  Kim et al. 2019: the bias head's cross entropy reaches the backbone reversed (as in DANN), and the backbone
        also minimises the bias prediction's negative conditional entropy sum_k p_k log p_k (weight
        algorithm.debias_weight): features on which the head cannot be sure.
  tabe  Alvi et al. 2018: the bias head learns the center on detached features (it alone); the backbone minimises
        the confusion loss, the cross entropy between the head's prediction and the uniform distribution over
        centers (weight debias_weight).
  clgr  TABE with gradient reversal: the bias head's own cross entropy also reaches the backbone, reversed.

TABE alternates a step of the bias head and a step of the classifier. Here both happen in one step on the same
batch with each gradient confined to its own parameters: the bias head's loss never moves the backbone (tabe),
the confusion and entropy terms never move the head (they go through the head with its parameters detached), so
the engine keeps one optimizer step a batch and every algorithm its one forward.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from .dann import DANN, ganin_coefficient, grad_reverse
from .losses import confusion_loss, domain_loss, negative_entropy


class _Debias(DANN):
    reverse = True  # the bias head's cross entropy reaches the backbone reversed
    term = "confusion"  # what the backbone minimises through the fixed head: confusion | negative_entropy

    def _fixed_head(self, features: torch.Tensor) -> torch.Tensor:
        """The bias head's logits with its parameters held fixed: the gradient reaches the features only."""
        params = {k: v.detach() for k, v in self.domain_head.named_parameters()}
        return functional_call(self.domain_head, params, (features,))

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        a = self.cfg.algorithm
        out, n_src, m = self.shared_forward(batch)
        logits = out["logits"][:n_src]
        cls_loss = self.classification_loss(logits, batch["y"], batch["domain"])
        features = out["features"][:m]
        coeff = ganin_coefficient(progress, a.grl_max) if self.reverse else 0.0
        dom_logits = self.domain_head(grad_reverse(features, coeff) if self.reverse else features.detach())
        domains = torch.cat([batch["domain"], batch["domain_target"]])
        dom_loss = domain_loss(dom_logits, domains, a.domain_loss, self.domain_weights if a.domain_reweight else None)
        fixed = self._fixed_head(features)
        debias = confusion_loss(fixed) if self.term == "confusion" else negative_entropy(fixed)
        loss = cls_loss + a.domain_weight * dom_loss + a.debias_weight * debias
        result = {"loss": loss, "logits": logits, "cls_loss": cls_loss.detach(), "dom_loss": dom_loss.detach(),
                  "dom_acc": (dom_logits.argmax(1) == domains).float().mean().detach(),
                  f"{'conf' if self.term == 'confusion' else 'negent'}_loss": debias.detach(),
                  "grl": torch.tensor(coeff)}
        return self.with_stain_losses(self.with_entropy(result, out["logits"][n_src:m]), out, m, batch)


class LNTL(_Debias):
    term = "negative_entropy"


class TABE(_Debias):
    reverse = False


class CLGR(_Debias):
    pass
