"""Test-time augmentation: every patch under the 8 dihedral views, as logits keyed by patch id.

The table format every later stage reads (tta_*.csv, held-out tables during training): id, center,
label, v0..v7 (one logit per view), for images (`predict_views`: all views of a batch in one forward
pass, gathered across processes with `gather_for_metrics`, so each id appears exactly once even when
the last batch was padded) and for stored features (`view_logits`). Used through the tasks by training
(held-out evaluation) and by the infer stage.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn

from .data.augment import N_VIEWS, dihedral, to_float
from .precision import autocast
from .progress import bar as progress_bar
from .errors import HistoshiftError

CPU_CHUNK = 64


def view_stack(x: torch.Tensor, views, preprocess) -> torch.Tensor:
    """All requested dihedral views of a float batch, one after another (V*B images), preprocessed:
    one forward pass serves every TTA view. `per_view` undoes the stacking on the outputs."""
    return preprocess(torch.cat([dihedral(x, k) for k in views]))


def per_view(out: torch.Tensor, n_views: int) -> torch.Tensor:
    """(V*B, ...) outputs of `view_stack` -> (B, V, ...)."""
    return out.view(n_views, -1, *out.shape[1:]).transpose(0, 1)


class PredictionError(HistoshiftError, ValueError):
    """A model produced logits that must not be saved (NaN / inf)."""


def check_finite(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """`table` unchanged when every logit column is finite; else one line naming `where` and an id."""
    cols = [c for c in table.columns if c == "logit" or (c.startswith("v") and c[1:].isdigit())]
    bad = ~np.isfinite(table[cols].to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        raise PredictionError(f"{where}: {int(bad.sum())} patches with non-finite logits (e.g. id "
                              f"{int(table['id'][bad].iloc[0])}): the model's weights or inputs hold NaN/inf; "
                              "retrain it (train --force) - nothing was written")
    return table


@torch.no_grad()
def predict_views(model: torch.nn.Module, loader, accelerator: Accelerator,
                  views=tuple(range(N_VIEWS)), desc: str = "predict", precision: str = "no",
                  channels_last: bool = False, transform=None, make_views=None) -> pd.DataFrame:
    """Logits for every dataset item under each dihedral view: id, center, label, v0..v{V-1} (`transform`: the
    config's input transform at inference, InputTransform.infer; None: the plain images). `make_views(x, centers)`,
    when given, makes the views instead (V x B images in [0, 1], e.g. Fourier transfers to V donors)."""
    model.eval()
    preprocess = accelerator.unwrap_model(model).preprocess
    ids, centers, labels, logits = [], [], [], []
    # GPUs want one big forward; CPUs run small batches faster (they stay in cache)
    chunk = CPU_CHUNK if accelerator.device.type == "cpu" else 1 << 30
    bar = progress_bar(loader, main=accelerator.is_local_main_process, desc=desc, unit="batch", leave=False)
    for batch in bar:
        x = to_float(batch["image"].to(accelerator.device))
        x = transform(x) if transform is not None else x
        if make_views is None:
            stacked, n_views = view_stack(x, views, preprocess), len(views)
        else:
            made = make_views(x, batch["center"])
            stacked, n_views = preprocess(made.flatten(0, 1)), made.shape[0]
        if channels_last:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        with autocast(accelerator.device, precision):
            out = torch.cat([model(part)["logits"].float() for part in stacked.split(chunk)])
        out = per_view(out, n_views).contiguous()
        g = accelerator.gather_for_metrics((batch["id"].to(accelerator.device), batch["center"].to(accelerator.device),
                                            batch["label"].to(accelerator.device), out))
        for store, value in zip((ids, centers, labels, logits), g):
            store.append(value.cpu())
    table = pd.DataFrame({"id": torch.cat(ids).numpy(), "center": torch.cat(centers).numpy(),
                          "label": torch.cat(labels).numpy().astype(int)})
    views_arr = torch.cat(logits).numpy()
    for j, k in enumerate(views if make_views is None else range(views_arr.shape[1])):
        table[f"v{k}"] = views_arr[:, j]
    return table


def view_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("v") and c[1:].isdigit()]


@torch.no_grad()
def view_logits(model: nn.Module, feats: torch.Tensor, batch: int = 8192) -> np.ndarray:
    """Per-view logits (n x V) of stored features (cast to float32 a batch at a time)."""
    model.eval()
    out = [model(feats[i:i + batch].flatten(0, 1).float())["logits"].view(-1, feats.shape[1])
           for i in range(0, len(feats), batch)]
    return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, feats.shape[1]), np.float32)


def views_table(table: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    out = table[["id", "center", "label"]].reset_index(drop=True).copy()
    for k in range(logits.shape[1]):
        out[f"v{k}"] = logits[:, k]
    return out

