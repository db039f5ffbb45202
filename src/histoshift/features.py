"""Frozen-backbone feature cache: embed every patch once (all 8 dihedral views), then train heads
(linear, MLP, with or without the DANN domain head) on the stored features in seconds.

work/features/<key>/ holds features_<split>.npy (N x V x D float16, rows in the cache's order)
and meta.json; <key> names the backbone, weights, input size and view count, so every config
that shares a frozen backbone shares one embedding. A head is a `FeatureClassifier`: the same
`backbone`/`head` interface as `PatchClassifier`, so every algorithm trains it unchanged.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .config import Config, ModelCfg
from .data.augment import per_view, to_float, view_stack
from .data.cache import SPLITS, Cache, gather_by_split
from .data.loader import PatchDataset, make_loader
from .models.backbone import PatchClassifier


def store_key(cfg: Config) -> str:
    m = cfg.model
    raw = f"{m.backbone}-{m.weights}-{m.input_size}px-{cfg.train.feature_views}v-{cfg.aug.stain_norm}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


class FeatureStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.arrays = {s: np.load(self.path / f"features_{s}.npy", mmap_mode="r") for s in SPLITS}
        self.dim = self.arrays["train"].shape[-1]
        self.views = self.arrays["train"].shape[1]

    def rows(self, table: pd.DataFrame) -> np.ndarray:
        """Features (n x V x D, float32) of the table's patches, in its order."""
        return gather_by_split(self.arrays, table).astype(np.float32)


@torch.no_grad()
def embed(cfg: Config, cache: Cache, root: Path, accelerator: Accelerator) -> FeatureStore:
    """Embed every cached patch with the frozen backbone (once per backbone, weights, size, views)."""
    path = Path(root) / store_key(cfg)
    if (path / "meta.json").exists():
        return FeatureStore(path)
    model = PatchClassifier(cfg.model).eval().to(accelerator.device)
    views = tuple(range(cfg.train.feature_views))
    path.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        table = cache.index[cache.index["split"] == split].sort_values("row")
        loader = accelerator.prepare(make_loader(PatchDataset(cache.images(split), table, {c: 0 for c in table.center}),
                                                 cfg.train.eval_batch_size, train=False))
        chunks = []
        for batch in tqdm(loader, desc=f"embed {split}", disable=not accelerator.is_local_main_process):
            x = to_float(batch["image"].to(accelerator.device), cfg.aug.stain_norm)
            stacked = view_stack(x, views, model.mean, model.std, cfg.model.input_size)
            f = per_view(model.backbone(stacked).float(), len(views))
            chunks.append(accelerator.gather_for_metrics(f.contiguous()).cpu().half().numpy())
        if accelerator.is_main_process:
            np.save(path / f"features_{split}.npy", np.concatenate(chunks))
    if accelerator.is_main_process:
        (path / "meta.json").write_text(json.dumps({"backbone": cfg.model.backbone, "weights": cfg.model.weights,
                                                    "input_size": cfg.model.input_size, "views": len(views)}))
    accelerator.wait_for_everyone()
    return FeatureStore(path)


class FeatureClassifier(nn.Module):
    """A head on stored features: `backbone` is identity (linear probe) or a hidden MLP layer."""

    def __init__(self, dim: int, cfg: ModelCfg):
        super().__init__()
        if cfg.head_hidden > 0:
            self.backbone = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.drop_rate))
            self.num_features = cfg.head_hidden
        else:
            self.backbone = nn.Identity()
            self.num_features = dim
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(self.num_features, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "logits": self.head(features).squeeze(1)}


def random_view(x: torch.Tensor) -> torch.Tensor:
    """B x V x D stored features -> B x D, one random dihedral view per patch (the head's augmentation)."""
    pick = torch.randint(0, x.shape[1], (x.shape[0],), device=x.device)
    return x[torch.arange(x.shape[0], device=x.device), pick]


@torch.no_grad()
def view_logits(model: nn.Module, feats: torch.Tensor, batch: int = 8192) -> np.ndarray:
    """Per-view logits (n x V) of stored features."""
    model.eval()
    out = [model(feats[i:i + batch].flatten(0, 1))["logits"].view(-1, feats.shape[1]) for i in range(0, len(feats), batch)]
    return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, feats.shape[1]), np.float32)


def views_table(table: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    out = table[["id", "center", "label"]].reset_index(drop=True).copy()
    for k in range(logits.shape[1]):
        out[f"v{k}"] = logits[:, k]
    return out

