"""Loss terms shared by the algorithms."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def focal_bce(logits: torch.Tensor, y: torch.Tensor, gamma: float = 0.0,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017): BCE weighted by (1 - p_t)^gamma; gamma = 0 is plain BCE.
    `weight`: one weight per sample (a weighted mean: sum(w l) / sum(w))."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
    if gamma:
        bce = (1 - torch.exp(-bce)) ** gamma * bce  # exp(-bce): the probability given to the true class
    if weight is None:
        return bce.mean()
    return (weight * bce).sum() / weight.sum()


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the tumour probability: low when the model is confident."""
    p = torch.sigmoid(logits.float())
    return F.binary_cross_entropy_with_logits(logits.float(), p, reduction="mean")


def domain_loss(logits: torch.Tensor, domains: torch.Tensor, kind: str = "ce",
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Domain-classifier loss: cross-entropy, or least squares on the softmax (LSGAN style: bounded,
    smoother gradients when the domain head is confident). `weight`: one weight per domain (a weighted
    mean over the samples, as torch's cross_entropy weight)."""
    if kind == "ce":
        return F.cross_entropy(logits.float(), domains, weight=weight)
    if kind == "ls":
        target = F.one_hot(domains, logits.shape[1]).float()
        per = ((torch.softmax(logits.float(), dim=1) - target) ** 2).sum(1)
        if weight is None:
            return per.mean()
        w = weight[domains]
        return (w * per).sum() / w.sum()
    raise ValueError(f"unknown domain loss '{kind}' (ce | ls)")


def bernoulli_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) between the tumour probabilities p = sigmoid(logits_p), q = sigmoid(logits_q)."""
    lp, lq = logits_p.float(), logits_q.float()
    p = torch.sigmoid(lp)
    # log p = logsigmoid(l), log (1 - p) = logsigmoid(-l): stable for large logits
    return (p * (F.logsigmoid(lp) - F.logsigmoid(lq)) + (1 - p) * (F.logsigmoid(-lp) - F.logsigmoid(-lq))).mean()


def consistency_loss(logits: torch.Tensor, logits_altered: torch.Tensor) -> torch.Tensor:
    """Stain-AgLr (a): the prediction for the altered copy should match the one for the image. The
    image's prediction is the target (no gradient), as in consistency regularisation (UDA, Xie et al.)."""
    return bernoulli_kl(logits.detach(), logits_altered)


def regeneration_loss(rebuilt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stain-AgLr (b): mean squared error between the decoder's image and the (pooled) original."""
    return F.mse_loss(rebuilt.float(), target.float())


def info_nce(z: torch.Tensor, source: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over views: `z` (N x D) embeddings of views, `source` (N,) the patch each came from. For each view,
    the other views of its patch are positives and every view of another patch a negative (views of the same
    patch are never negatives; itself is excluded): the mean over anchors of -log(sum_pos e^s / sum_pos+neg e^s),
    s the cosine similarity / temperature. Two views a patch: SimCLR's NT-Xent."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    same = source[:, None] == source[None, :]
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positive = same & ~self_mask
    sim = sim.masked_fill(self_mask, float("-inf"))  # never its own pair
    log_all = torch.logsumexp(sim, dim=1)
    log_pos = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of sum_k p_k log p_k, p = softmax(logits): -log K at the uniform prediction (its
    minimum), 0 at a certain one. LNTL's term: minimising it makes the bias prediction unsure."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1).mean()


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy between the uniform distribution over K classes and p = softmax(logits):
    -(1/K) sum_k log p_k = log K + KL(uniform || p), so log K at the uniform prediction (its minimum). TABE's
    and CLGR's term (Alvi et al. 2018)."""
    return -F.log_softmax(logits.float(), dim=1).mean(1).mean()
