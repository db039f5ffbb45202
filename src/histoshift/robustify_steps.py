"""Robustify's training steps (the `robustify` stage runs them on steploop.StepLoop): two stain views of each
patch embed alike (InfoNCE, algorithms/losses.py), the backbone made trainable as models/robust.py says (LoRA
adapters or the last CNN block groups). AdamW, linear warm-up (10%) then cosine. The patches, views and jitter are
a function of (seed, step, process): a resumed run sees the same ones.
"""
from __future__ import annotations

import numpy as np
import torch

from .algorithms.losses import info_nce
from .data.augment import random_dihedral, to_float
from .engine import warmup_cosine
from .models.backbone import PatchClassifier
from .models.robust import RobustifyError, make_trainable
from .precision import autocast
from .stain.classical import reinhard
from .stain.hed import random_hed


def stain_views(cache, rows, n: int, rng, sigma: float, device, pair: str = "hed"):
    """n distinct patches of `rows` (with replacement only when there are fewer), two stain views of each:
    (2n x 3 x H x W floats in [0, 1], the patch number of each view). pair=reinhard: the second view first takes
    the colour statistics of a random patch of another center (any center where `rows` holds only one)."""
    at = np.sort(rng.choice(len(rows), n, replace=len(rows) < n))
    x = to_float(torch.from_numpy(cache.gather(rows.iloc[at])).to(device))
    second = x
    if pair == "reinhard":
        centers = rows["center"].to_numpy()
        donors = [rng.choice(np.flatnonzero(centers != centers[i]) if (centers != centers[i]).any() else len(rows))
                  for i in at]
        second = reinhard(x, to_float(torch.from_numpy(cache.gather(rows.iloc[donors])).to(device)))
    jitter = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    views = [random_hed(random_dihedral(v, jitter), sigma, jitter) if sigma > 0 else random_dihedral(v, jitter)
             for v in (x, second)]
    source = torch.arange(n, device=device).repeat(2)
    return torch.cat(views), source


class RobustSteps:
    """The base backbone made trainable, its optimiser and schedule (prepared by Accelerate) and one step."""

    def __init__(self, cfg, cache, accelerator, precision: str):
        r = self.r = cfg.model.robustify
        torch.manual_seed(r.seed)
        model = PatchClassifier(cfg.model)  # the base backbone with its weights (the hub, a copy, a package)
        backbone, self.method = make_trainable(model.backbone, cfg.model)
        self.preprocess = model.preprocess
        self.trainable = [p for p in backbone.parameters() if p.requires_grad]
        if not self.trainable:
            raise RobustifyError(f"model.robustify: nothing of {cfg.model.recipe or cfg.model.backbone} is left to "
                                 f"tune (method {self.method}); raise model.robustify.cnn_last_blocks")
        optimizer = torch.optim.AdamW(self.trainable, lr=r.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(r.steps, 0.1))
        self.backbone, self.optimizer = accelerator.prepare(backbone, optimizer)
        self.acc, self.cache, self.precision = accelerator, cache, precision
        self.rows = cache.index[~cache.index["aberrant"]] if "aberrant" in cache.index else cache.index
        self.nbytes = 4 * sum(p.numel() * p.element_size() for p in accelerator.unwrap_model(backbone).parameters())

    def step(self, step: int) -> dict[str, float]:
        r, acc = self.r, self.acc
        core = acc.unwrap_model(self.backbone)
        core.train()
        for m in core.modules():  # the frozen part keeps its batch-norm statistics
            frozen = not any(p.requires_grad for p in m.parameters())
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and frozen:
                m.eval()
        rng = np.random.default_rng([r.seed, step, acc.process_index])
        x, source = stain_views(self.cache, self.rows, r.batch_size, rng, r.hed_sigma, acc.device, r.pair)
        with autocast(acc.device, self.precision):
            z = self.backbone(self.preprocess(x))
        loss = info_nce(z, source, r.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach())}

    def state(self) -> tuple[dict, dict]:
        return {"scheduler": self.scheduler.state_dict()}, {}

    def restore(self, extra: dict, folder) -> None:
        self.scheduler.load_state_dict(extra["scheduler"])
