"""AIVA, unsupervised site adaptation by intra-site variability alignment (Goodman et al., DART 2022, pp. 56-65):
the variability inside the source centers and inside the target centers is matched, cluster by cluster.

Once an epoch (`before_epoch`, before its first step): the features of up to algorithm.aiva_samples labelled and as
many unlabelled patches of the epoch's streams, in eval mode, are projected on their joint principal components
(algorithm.aiva_dims), clustered separately (k-means, algorithm.aiva_clusters clusters each), and every target
cluster is matched to one source cluster by the Hungarian method on the distance between their centers. At each
step every unlabelled patch joins its nearest target cluster and the loss pulls the batch mean of each target
cluster, in the projected space, towards its matched source center (weight algorithm.aiva_weight; the mean over
the clusters present). `aiva` adds this to ERM, `dann_aiva` to DANN. The projection, clusters and matching are
a function of the weights, the epoch's data and (seed, epoch): a resumed run recomputes the same ones.

Where this deviates from the paper: its target is one site; here the unlabelled stream pools every unlabelled
center of the fold (the held-out center and the test center), clustered together as one target.
"""
from __future__ import annotations

import numpy as np
import torch

from .dann import DANN
from .erm import ERM


def match_clusters(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """For k target and k source cluster centers (k x d): the source cluster of each target cluster, the
    assignment of least total distance (the Hungarian method, scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = np.linalg.norm(target[:, None, :] - source[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def alignment_loss(z: torch.Tensor, target_centers: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """`z` (B x d) projected target features: each joins its nearest target center; the mean over the clusters
    present of the squared distance between the cluster's batch mean and `matched` (its source center, k x d)."""
    cluster = torch.cdist(z.detach().float(), target_centers).argmin(1)
    losses = [((z[cluster == c].float().mean(0) - matched[c]) ** 2).sum() for c in cluster.unique()]
    return torch.stack(losses).mean()


class _Aligned:
    """The AIVA term on top of an algorithm with unlabelled target batches (mixed in before it)."""
    uses_target = True
    embeds_each_epoch = True

    def _init_aiva(self) -> None:
        a = self.cfg.algorithm
        self.register_buffer("aiva_mean", torch.zeros(self.model.num_features))
        self.register_buffer("aiva_basis", torch.zeros(self.model.num_features, a.aiva_dims))
        self.register_buffer("aiva_target", torch.zeros(a.aiva_clusters, a.aiva_dims))
        self.register_buffer("aiva_matched", torch.zeros(a.aiva_clusters, a.aiva_dims))
        self.aiva_ready = False

    @torch.no_grad()
    def before_epoch(self, batches, gather, seed: int) -> None:
        """`batches`: the epoch's fed batches (x, x_target); `gather`: concatenates a tensor over processes."""
        from sklearn.cluster import KMeans

        a, was_training = self.cfg.algorithm, self.model.training
        self.model.eval()
        src, tgt, n = [], [], 0
        for batch in batches:
            src.append(self.model(batch["x"])["features"].float())
            tgt.append(self.model(batch["x_target"])["features"].float())
            n += len(batch["x"])
            if n >= a.aiva_samples:
                break
        self.model.train(was_training)
        s, t = gather(torch.cat(src)).cpu().double(), gather(torch.cat(tgt)).cpu().double()
        both = torch.cat([s, t])
        mean = both.mean(0)
        k = min(a.aiva_dims, len(both) - 1, both.shape[1])
        basis = torch.linalg.svd(both - mean, full_matrices=False).Vh[:k].T  # d x k: principal directions
        if k < a.aiva_dims:  # too few samples for the full projection: pad with zero directions
            basis = torch.cat([basis, basis.new_zeros(basis.shape[0], a.aiva_dims - k)], 1)
        zs, zt = ((s - mean) @ basis).numpy(), ((t - mean) @ basis).numpy()
        clusters = min(a.aiva_clusters, len(zs), len(zt))
        km = [KMeans(clusters, n_init=3, random_state=seed).fit(z).cluster_centers_ for z in (zs, zt)]
        matched = km[0][match_clusters(km[1], km[0])]
        device = self.aiva_mean.device
        self.aiva_mean.copy_(mean.float().to(device))
        self.aiva_basis.copy_(basis.float().to(device))
        self.aiva_target.zero_(), self.aiva_matched.zero_()
        self.aiva_target[:clusters] = torch.as_tensor(km[1], dtype=torch.float32, device=device)
        self.aiva_matched[:clusters] = torch.as_tensor(matched, dtype=torch.float32, device=device)
        self.aiva_clusters_used, self.aiva_ready = clusters, True

    def with_alignment(self, result: dict, target_features: torch.Tensor) -> dict:
        if not self.aiva_ready:
            raise RuntimeError("AIVA: before_epoch was not called before the epoch's first step")
        k = self.aiva_clusters_used
        z = (target_features.float() - self.aiva_mean) @ self.aiva_basis
        align = alignment_loss(z, self.aiva_target[:k], self.aiva_matched[:k])
        result["loss"] = result["loss"] + self.cfg.algorithm.aiva_weight * align
        result["aiva_loss"] = align.detach()
        return result

    def forward(self, batch: dict, progress: float = 0.0) -> dict:
        features = {}

        def keep(module, inputs, out) -> None:  # the shared forward's features (returning None keeps the output)
            features.setdefault("f", out["features"])
        hook = self.model.register_forward_hook(keep)
        try:
            result = super().forward(batch, progress)
        finally:
            hook.remove()
        n, m = len(batch["x"]), len(batch["x"]) + len(batch["x_target"])
        return self.with_alignment(result, features["f"][n:m])


class AIVA(_Aligned, ERM):
    def __init__(self, model, n_domains, cfg):
        super().__init__(model, n_domains, cfg)
        self._init_aiva()


class DANN_AIVA(_Aligned, DANN):
    def __init__(self, model, n_domains, cfg):
        super().__init__(model, n_domains, cfg)
        self._init_aiva()
