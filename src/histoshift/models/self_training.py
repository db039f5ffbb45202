"""Self-training of a head on frozen features, the third label-free adaptation of `infer --adapt`
(after the feature shift of `feature_shift.py`): a few rounds of

  1. label the target center's patches with the head's own TTA-mean probability,
  2. keep the confident ones (probability >= threshold or <= 1 - threshold),
  3. train the head one pass over them, each batch beside an equally sized batch of the fold's labelled
     training rows (so the head cannot drift away from what it learned).

Heads train in seconds, so rounds are cheap. The target's labels are never read: only its features and
the head's own predictions. Inputs are already in the head's input space (the shift applied), so the
rounds train the layers behind the shift (`FeatureClassifier.classify`) and never re-estimate it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SelfTraining:
    rounds: int
    threshold: float  # confidence a pseudo-label needs, in (0.5, 1)
    lr: float
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if not 0.5 < self.threshold < 1:
            raise ValueError(f"self-training threshold: expected a value in (0.5, 1), got {self.threshold}")

    @torch.no_grad()
    def target_probability(self, model, target: torch.Tensor) -> torch.Tensor:
        """TTA-mean tumour probability of every target patch (n x V x D inputs)."""
        model.eval()
        logits = [model.classify(target[i:i + 4096].flatten(0, 1).float()).view(-1, target.shape[1])
                  for i in range(0, len(target), 4096)]
        return torch.sigmoid(torch.cat(logits).mean(1))

    def __call__(self, model, source: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> dict:
        """Train `model` in place (the caller's copy). `source`: n x V x D labelled inputs with `labels` (n);
        `target`: m x V x D unlabelled inputs. Returns the record written beside the predictions. Seeded:
        the same inputs give the same head (dropout's draws included, the caller's RNG left as it was)."""
        devices = [target.device] if target.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self._rounds(model, source, labels, target)

    def _rounds(self, model, source: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> dict:
        gen = torch.Generator().manual_seed(self.seed)
        # the feature shift holds statistics (buffers), no parameters: the optimizer cannot move it
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        labels, counts, positive = labels.float(), [], []
        for _ in range(self.rounds):
            prob = self.target_probability(model, target)
            sure = torch.nonzero((prob >= self.threshold) | (prob <= 1 - self.threshold)).flatten().cpu()
            counts.append(len(sure))
            if not len(sure):
                break
            pseudo = (prob >= 0.5).float()
            positive.append(round(float(pseudo[sure.to(prob.device)].mean()), 4))
            model.train()
            order = sure[torch.randperm(len(sure), generator=gen)]
            for k in range(math.ceil(len(order) / self.batch_size)):
                t = order[k * self.batch_size:(k + 1) * self.batch_size]
                s = torch.randint(0, len(source), (len(t),), generator=gen)
                x = torch.cat([_one_view(source, s, gen), _one_view(target, t, gen)])
                y = torch.cat([labels[s.to(labels.device)], pseudo[t.to(pseudo.device)]])
                loss = F.binary_cross_entropy_with_logits(model.classify(x.float()), y.to(x.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.after_step(optimizer)  # a sparse probe stays sparse
        model.eval()
        return {"self_training": {"rounds": self.rounds, "threshold": self.threshold,
                                  "pseudo_labelled": counts, "positive_share": positive}}


def _one_view(feats: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random stored view of each row (the head's augmentation, as in training)."""
    views = torch.randint(0, feats.shape[1], (len(rows),), generator=gen)
    return feats[rows.to(feats.device), views.to(feats.device)]
