"""Stage `embed`: a heads-on-features config's frozen backbone embeds every patch once (features/)."""
from __future__ import annotations

from . import Stage, config_arguments, experiment, timed

STAGE = Stage("embed every patch once with the backbone of a heads-on-features config (model.kind: feature; "
              "resumes a killed run; a fine-tuned config has nothing to embed)",
              "--config YAML, work/cache/; foundation models: the hub, HF_HUB_CACHE or model.weights",
              "work/features/<key>/: features_{train,val,test}.npy, spec.json, meta.json (key: everything the "
              "features depend on)",
              flow="configs/*.yaml, work/cache/ -> work/features/<key>/")


def arguments(p) -> None:
    config_arguments(p, "model.feature_hed_views=4")


def run(a, paths) -> None:
    cfg = experiment(a)
    if not cfg.model.embeds:  # before torch is imported: train.sh asks every config
        print(
            f"embed: {cfg.name}: a fine-tuned ({cfg.model.kind}) config reads images from the cache: nothing to embed"
        )
        return
    from accelerate import Accelerator

    from ..data.cache import Cache, check_inputs
    from ..tasks import make_task

    check_inputs(paths.input, paths.cache)
    task = make_task(cfg, Cache.open(paths.cache), paths, Accelerator())
    store = timed("embed", task.stored_data)
    print(f"embed: {cfg.name}: features in {store.path}")
