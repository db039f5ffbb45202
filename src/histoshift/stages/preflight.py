"""Stage `preflight`: before anything long starts, one table for every config about to run - can its weights be
had, does its feature store fit on the disk, do the weights fit the GPU's free memory, and how long would
robustifying the backbone (model.robustify) and embedding take on this device (the checks: preflight_checks.py).
Every problem is one line; any problem stops the run (exit 2) before anything is embedded. Configs whose stores
would be one (`features.store.store_settings`, the embed stage's own identity) count once.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import Stage

STAGE = Stage("check every config before anything long starts: weights reachable (cache, folder, file, "
              "package, optional dependency, gated access), feature store size against free disk, GPU "
              "memory, projected embedding time; each problem one line, exit 2",
              "--config YAML (repeatable), work/cache/ or input/*.h5 (patch counts), the hub cache",
              "nothing (prints a table)",
              flow="configs/*.yaml -> (prints the preflight table)")


def arguments(p) -> None:
    p.add_argument("--config", required=True, action="append", help="a config about to run (repeat for several)")


def run(a, paths) -> int:
    from ..tasks import load_experiment

    configs = [(Path(c).stem, load_experiment(c)) for c in a.config]
    checks = preflight(configs, paths)
    print(table(checks, paths), flush=True)
    problems = [p for c in checks for p in c.problems]
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print(f"preflight: {len(checks)} config(s) ready")
    return 2 if problems else 0


def _cache_id(paths) -> str | None:
    from ..data.cache import Cache

    return Cache.open(paths.cache).id if (paths.cache / "manifest.json").is_file() else None


def _existing_store(cfg, paths, precision: str) -> bool:
    """Whether this config's complete feature store is already there (needs the prepared cache)."""
    from ..data.cache import Cache
    from ..features.store import feature_spec, store_key
    from ..models.robust import robust_identity
    from ..stain.gan import identity

    if not (paths.cache / "manifest.json").is_file():
        return False
    try:
        cache = Cache.open(paths.cache)
        gan = identity(cfg, cache, paths) if cfg.aug.stain_norm == "gan" else None
        robust = robust_identity(cfg.model, cache.id, paths.robust) if cfg.model.robustify is not None else None
        return (paths.features / store_key(feature_spec(cfg, cache, precision, gan, robust)) / "meta.json").is_file()
    except Exception:  # noqa: BLE001 - weights, generator or tuned backbone not at hand: said elsewhere or to come
        return False


def _robustify_time(cfg, paths, flops: float, rate: float) -> str:
    """The robustify stage's projected time (its steps x batch x 2 views, forward + backward: about 3 forward
    passes each), or that the tuned backbone is already there."""
    from ..models.robust import META, robust_folder
    from ..preflight_checks import ViT_EFFICIENCY, human

    r, cache_id = cfg.model.robustify, _cache_id(paths)
    if cache_id is not None and (robust_folder(cfg.model, cache_id, paths.robust)[1] / META).is_file():
        return "tuned already"
    images = r.steps * r.batch_size * 2
    return f"{human(3 * images * flops / (rate * ViT_EFFICIENCY))} ({r.steps} steps x {r.batch_size} x 2 views)"


def preflight(configs: list, paths) -> list:
    """One Check per config; problems collected, nothing embedded."""
    import json

    import torch

    from ..features.store import store_settings
    from ..models.foundation import RecipeError
    from ..models.weights import WeightsError
    from ..precision import config_precision
    from ..preflight_checks import (HEADROOM, ViT_EFFICIENCY, Check, activation_bytes, architecture, check_weights,
                             forward_flops, free_bytes, human, matmul_rate, patch_counts, weights_bytes)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = patch_counts(paths)
    checks, rates, needed, counted = [], {}, 0.0, {}
    for name, cfg in configs:
        model = cfg.model.recipe or cfg.model.backbone
        check = Check(config=name, model=model)
        checks.append(check)
        check_weights(check, cfg)
        precision = config_precision(cfg)
        try:
            net, dim = architecture(cfg)
        except (WeightsError, RecipeError) as e:  # e.g. an optional dependency: already said above, or say it
            check.problems[:] = check.problems or [f"{check.config}: {e}"]
            continue
        held = weights_bytes(net.backbone)  # as loaded: float32 whatever the autocast precision
        # the embed stage's first forward: the 2-patch probe (or model.embed_batch_size) x every view of a patch
        images, acts = 0, 0
        if cfg.model.embeds:  # (a fine-tuned backbone's batch is the trainer's: not estimated here)
            images = (cfg.model.embed_batch_size or 2) * (cfg.model.feature_views + cfg.model.feature_hed_views)
            acts = images * activation_bytes(net.backbone, net.preprocess.size)  # computed on the meta device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            check.gpu = (f"{free / 2**30:.1f} GiB free, weights {held / 2**30:.1f} GiB + activations "
                         f"{acts / 2**30:.2f} GiB at the first batch ({images} images; computed)")
            if held + acts > free:
                check.problems.append(f"{check.config}: {model}'s weights ({held / 2**30:.1f} GiB as loaded, autocast "
                                      f"{precision}) and the activations of its first batch ({images} images: "
                                      f"{acts / 2**30:.2f} GiB, computed) exceed the GPU's free memory "
                                      f"({free / 2**30:.1f} GiB)")
        else:
            check.gpu = "no GPU (CPU)"
        if precision not in rates:
            rates[precision] = matmul_rate(device, precision)
        flops = forward_flops(net.backbone, net.preprocess.size)  # the meta-device network built above
        if cfg.model.robustify is not None:
            check.robustify = _robustify_time(cfg, paths, flops, rates[precision])
        if not cfg.model.embeds or counts is None:
            continue
        m = cfg.model
        check.images = sum(n * (m.feature_views + (m.feature_hed_views if split != "test" else 0))
                           for split, n in counts.items())
        if _existing_store(cfg, paths, precision):
            check.store_gb, check.projected = 0.0, "stored already"
            continue
        check.store_gb = check.images * dim * 2 / 1e9  # float16 features
        shared = json.dumps(store_settings(cfg, precision), sort_keys=True, default=str)  # the embed stage's too
        if shared in counted:  # a second head on the same backbone and views: one store for both
            check.store_gb, check.projected = 0.0, f"shared with {counted[shared]}"
            continue
        counted[shared] = check.config
        needed += check.store_gb
        check.projected = human(check.images * flops / (rates[precision] * ViT_EFFICIENCY))
    free = free_bytes(paths.features) / 1e9
    if needed * HEADROOM > free and checks:
        checks[-1].problems.append(
            f"disk: the feature stores to write need {needed:.2f} GB (+5%), {paths.features} has "
            f"{free:.2f} GB free: free some space or point --root at a larger disk"
        )
    return checks


def table(checks: list, paths) -> str:
    from ..preflight_checks import free_bytes, offline

    free = free_bytes(paths.features) / 1e9
    rows = ["| config | model | weights | images to embed | feature store | GPU | projected embedding | robustify | "
            "status |", "|---|---|---|---:|---:|---|---|---|---|"]
    for c in checks:
        store = "-" if c.store_gb is None else f"{c.store_gb:.2f} GB"
        status = "ok" if not c.problems else f"{len(c.problems)} problem(s)"
        rows.append(f"| {c.config} | {c.model} | {c.weights or '-'} | {c.images or '-'} | {store} | {c.gpu} | "
                    f"{c.projected} | {c.robustify} | {status} |")
    rows.append(f"\nfree disk at {paths.features}: {free:.2f} GB; HF_HUB_OFFLINE={int(offline())}; "
                "projected times are estimates (FLOPs / measured matmul rate), bench/fm.py measures")
    return "\n".join(rows)
