"""What tests share besides fixtures (those are conftest.py's): where things are, the competition layout written
small, the one factory of tiny configs, a foundation-model config on a stand-in, the refusal line, a user's clone."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PCAM = REPO.parent / "shared" / "data" / "pcam"

# the smallest model that trains on 2 cores in seconds: timm's test network at 64 px, random init
TINY_MODEL = {"backbone": "test_efficientnet", "weights": "none", "input_size": 64}
TINY_TRAIN = {"epochs": 1, "batch_size": 16, "target_batch_size": 8}


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def tiny_config(kind: str = "image", **sections) -> dict:
    """A tiny experiment as a config mapping: TINY_MODEL of `kind` (image: fine-tuned; feature: a head on its
    stored features), ERM, one epoch of batches of 16; `sections` are merged in section by section, e.g.
    tiny_config("feature", name="head", model={"head_hidden": 16}, algorithm={"name": "dann"})."""
    base = {"model": {**TINY_MODEL, "kind": kind}, "algorithm": {"name": "erm"}, "train": dict(TINY_TRAIN)}
    return _merge(base, sections)


FROZEN = tiny_config("feature", train={"epochs": 2})  # the `finished` root's member: a head on stored features
IMAGE = tiny_config()  # the `pipeline_root`'s member: a fine-tuned backbone


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def write_h5(path: Path, items: dict, dtype=np.float32) -> Path:
    """items: {id: (img CHW, label, center)}; writes the competition layout."""
    with h5py.File(path, "w") as f:
        for i, (img, label, center) in items.items():
            g = f.create_group(str(i))
            g["img"] = img.astype(dtype) if dtype is not None else img
            g["label"] = np.int64(label)
            g["metadata"] = np.array([center, 0], dtype=np.int64)
    return path


def random_items(rng, ids, center, side=96, label=None):
    return {
        i: (rng.random((3, side, side)).astype(np.float32), int(rng.integers(0, 2)) if label is None else label, center)
        for i in ids
    }


def one_error_line(capsys) -> str:
    """The refusal: exactly one `error:` line, the last thing on stderr (progress bars may precede it)."""
    err = capsys.readouterr().err.strip().splitlines()
    (line,) = [l for l in err if l.startswith("error:")]
    assert err[-1] == line
    return line


def fm_config(path: Path, name: str, weights: str = "hub", **model_extra) -> Path:
    """A head on a foundation recipe's stored features (2 HED views), loadable from its stand-in."""
    from histoshift.models.foundation import RECIPES
    from histoshift.models.foundation.standin import standin_overrides

    recipe = RECIPES[name]
    model = {"recipe": name, "weights": weights, "kind": "feature", "head_hidden": 16, "feature_hed_views": 2,
             **model_extra}
    if standin_overrides(recipe):
        model["recipe_overrides"] = standin_overrides(recipe)
    return write_config(path, {"model": model, "algorithm": {"name": "dann"},
                               "train": {"epochs": 2, "batch_size": 16, "target_batch_size": 8}})


def clone(tmp_path: Path) -> Path:
    """The files a user's clone has (no .venv, no work/): the scripts run there."""
    out = tmp_path / "repo"
    out.mkdir()
    for name in ("train.sh", "infer.sh", "requirements.txt", "pyproject.toml"):
        shutil.copy(REPO / name, out / name)
    for name in ("src", "configs", "scripts"):
        shutil.copytree(REPO / name, out / name, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def small_demo(clone: Path, env: dict, per_center: int = 32, test_size: int = 32) -> None:
    """A smaller demo dataset than the scripts' own (160 a labelled center, 240 test patches), written before
    train.sh (which keeps it): the scripts' logic needs no more, and two CPU cores pay for every patch (the
    foundation set's 480 px MedImageInsight stand-in embeds 12 views of each at 45 images/s)."""
    subprocess.run([sys.executable, "-m", "histoshift", "--root", "demo", "demo-data", "--per-center", str(per_center),
                    "--test-size", str(test_size)], cwd=clone, env=env, check=True, capture_output=True, timeout=1800)
