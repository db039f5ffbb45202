"""Stage `robustify`: tune a config's backbone so that stain views of one patch embed alike (model.robustify).

The objective of "Robustifying pathology foundation models" (arXiv 2607.22861) without scanner pairs: two views of
each unlabelled patch, drawn from every center of the cache (train, val and test images; no label is read), each a
random dihedral view with strong HED stain jitter (model.robustify.pair=reinhard: the second view first takes the
colour statistics of a patch of another center); InfoNCE between the views (models/robust.py: views of one patch
are never negatives), LoRA adapters (peft) for foundation recipes, the last block groups for timm CNNs (the tuned
part's batch norms train, the frozen part's keep their statistics). AdamW, 10% linear warm-up then cosine. The
batches and the jitter are a function of (seed, step, process): a killed run resumes (state-step<N>/, nothing
unpickled) to the same weights. The tuned backbone is a new identity: `embed` and `train` use it for a config with
model.robustify, and the feature store's key and the runs' lineage name it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import Stage, config_arguments, experiment, timed

STAGE = Stage("tune a config's backbone so that stain views of one unlabelled patch embed alike (model.robustify)",
              "--config YAML with model.robustify; work/cache/ (every center's images, no labels)",
              "work/robust/<key>/: tuned.safetensors (LoRA adapters or the CNN), meta.json, losses.csv",
              flow="configs/*.yaml, work/cache/ -> work/robust/<key>/")
RECORD_EVERY = 10  # steps per line of losses.csv
AGAIN = "robustify --force starts it again"


def arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="tune again (the previous tuned backbone is kept aside)")
    config_arguments(p, "model.robustify.steps=100")


def run(a, paths) -> None:
    from ..data.cache import Cache, check_inputs

    cfg = experiment(a)
    if cfg.model.robustify is None:  # before torch is imported: train.sh asks every config
        print(f"robustify: {cfg.name} has no model.robustify: nothing to tune")
        return
    check_inputs(paths.input, paths.cache)
    timed("robustify", robustify, cfg, Cache.open(paths.cache), paths, force=a.force)


def robustify(cfg, cache, paths, force: bool = False, accelerator=None) -> Path:
    """Tune (or resume, or keep) the backbone of `cfg.model.robustify` on `cache`; returns its folder."""
    from accelerate import Accelerator

    from ..models.robust import META, robust_folder
    from ..checkpoint import exclusive_folder
    from ..precision import config_precision

    spec, folder = robust_folder(cfg.model, cache.id, paths.robust)
    precision = config_precision(cfg)
    acc = accelerator or Accelerator(mixed_precision="fp16" if precision == "fp16" else "no")
    if (folder / META).exists() and not force:
        acc.print(f"robustify: {folder} is tuned for this backbone, cache and these settings, keeping it")
        return folder
    with exclusive_folder(acc, folder, META, force, "tuned backbone", "robustify"):  # one process tunes it at a time
        _fit(cfg, cache, spec, folder, acc, precision)
    return folder


def _views(cache, rows, n: int, rng, sigma: float, device, pair: str = "hed"):
    """n distinct patches of `rows` (with replacement only when there are fewer), two stain views of each:
    (2n x 3 x H x W floats in [0, 1], the patch number of each view). pair=reinhard: the second view first takes
    the colour statistics of a random patch of another center (any center where `rows` holds only one)."""
    import numpy as np
    import torch

    from ..data.augment import random_dihedral, to_float
    from ..stain.classical import reinhard
    from ..stain.hed import random_hed

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


def _fit(cfg, cache, spec: dict, folder: Path, acc, precision: str) -> None:
    import numpy as np
    import torch

    from ..algorithms.losses import info_nce
    from ..checkpoint import last_state, load_state, save_state
    from ..engine import warmup_cosine
    from ..errors import require_finite
    from ..models.backbone import PatchClassifier
    from ..models.robust import make_trainable
    from ..precision import autocast
    from ..progress import bar

    r = cfg.model.robustify
    torch.manual_seed(r.seed)
    model = PatchClassifier(cfg.model)  # the base backbone with its weights (the hub, a copy, a package)
    backbone, method = make_trainable(model.backbone, cfg.model)
    preprocess = model.preprocess
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    if not trainable:
        from ..models.robust import RobustifyError
        raise RobustifyError(f"model.robustify: nothing of {cfg.model.recipe or cfg.model.backbone} is left to tune "
                             f"(method {method}); raise model.robustify.cnn_last_blocks")
    optimizer = torch.optim.AdamW(trainable, lr=r.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(r.steps, 0.1))
    backbone, optimizer = acc.prepare(backbone, optimizer)
    rows = cache.index[~cache.index["aberrant"]] if "aberrant" in cache.index else cache.index
    start, seconds, records = 0, 0.0, []
    state = last_state(folder, "state-step")
    if state is not None:
        loop = load_state(acc, state, AGAIN)
        start, seconds, records = loop["step"], loop["seconds"], loop["records"]
        scheduler.load_state_dict(loop["scheduler"])
        acc.print(f"robustify: resuming {folder.name} after step {start} of {r.steps}")
    acc.print(
        f"robustify: {folder.name}: {method}, {sum(p.numel() for p in trainable):,} parameters tune, "
        f"{len(rows)} patches of centers {sorted(int(c) for c in rows['center'].unique())}, precision {precision}"
    )
    nbytes = 4 * sum(p.numel() * p.element_size() for p in acc.unwrap_model(backbone).parameters())
    t0, logs = time.time() - seconds, []
    steps = bar(range(start, r.steps), main=acc.is_local_main_process, unit="step", desc=f"robustify {folder.name}",
                initial=start, total=r.steps)
    for step in steps:
        acc.unwrap_model(backbone).train()
        for m in acc.unwrap_model(backbone).modules():  # the frozen part keeps its batch-norm statistics
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()
            ):
                m.eval()
        rng = np.random.default_rng([r.seed, step, acc.process_index])
        x, source = _views(cache, rows, r.batch_size, rng, r.hed_sigma, acc.device, r.pair)
        with autocast(acc.device, precision):
            z = backbone(preprocess(x))
        loss = info_nce(z, source, r.temperature)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        require_finite([value], f"{folder}: the robustify loss became non-finite at step {step + 1}; lower "
                                "model.robustify.lr - the backbone is not marked tuned")
        logs.append(value)
        steps.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if done % RECORD_EVERY == 0 or done == r.steps:
            records.append(
                {"step": done, "seconds": round(time.time() - t0, 1), "loss": round(float(np.mean(logs)), 5)}
            )
            logs = []
        if done % r.checkpoint_every == 0 and done < r.steps:
            save_state(
                acc,
                folder / f"state-step{done}",
                {"step": done, "seconds": time.time() - t0, "records": records, "scheduler": scheduler.state_dict()},
                nbytes,
                f"saving the robustify state at step {done}",
            )
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(acc.unwrap_model(backbone), method, spec, folder, records, time.time() - t0, r.steps)
    acc.wait_for_everyone()


def _finish(backbone, method: str, spec: dict, folder: Path, records: list, seconds: float, steps: int) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    from ..lineage import digest_file
    from ..models.robust import META, TUNED, tuned_state
    from ..safeio import atomic, write_csv, write_json

    with atomic(folder / TUNED) as tmp:
        save_file(tuned_state(backbone, method), str(tmp))
    write_csv(folder / "losses.csv", pd.DataFrame(records), index=False)
    write_json(folder / META, {"spec": spec, "key": folder.name, "method": method, "tuned": digest_file(folder / TUNED),
                               "steps": steps, "seconds": round(seconds, 1),
                               "first": records[0] if records else {}, "final": records[-1] if records else {}})
    for old in folder.glob("state-step*"):
        shutil.rmtree(old, ignore_errors=True)
    first, last = (records[0]["loss"], records[-1]["loss"]) if records else (float("nan"),) * 2
    print(
        f"robustify: tuned backbone in {folder / TUNED} ({steps} steps, {seconds:.0f} s; InfoNCE {first:.3f} -> "
        f"{last:.3f})"
    )
