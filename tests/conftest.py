"""Shared fixtures: tiny datasets in the competition layout, generated per test session."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
PCAM = REPO.parent / "shared" / "data" / "pcam"


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
    return {i: (rng.random((3, side, side)).astype(np.float32), int(rng.integers(0, 2)) if label is None else label, center)
            for i in ids}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A root folder with a tiny synthetic demo dataset in input/ (read-only for tests: copy to change)."""
    from histoshift.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo_root")
    make_demo(root / "input", per_center=24, test_size=30, n_aberrant=2, seed=1)
    return root


@pytest.fixture(scope="session")
def prepared_root(demo_root, tmp_path_factory) -> Path:
    """demo_root copied, prepared (cache) and with folds written."""
    import shutil

    from histoshift.data.cache import prepare
    from histoshift.data.folds import write_folds

    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(demo_root / "input", root / "input")
    index = prepare(root / "input", root / "work" / "cache")
    write_folds(index, root / "folds" / "folds.csv")
    return root
