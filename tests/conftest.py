"""Shared fixtures: tiny datasets in the competition layout, generated per test session."""
from __future__ import annotations

import os
from pathlib import Path

import shutil

import h5py
import numpy as np
import pytest
import yaml

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


TRAINED_ROOTS = {"finished", "pipeline_root"}  # fixtures that train models: their tests are in the slow tier


def pytest_collection_modifyitems(items):
    """The quick tier (`-m "not slow"`) leaves out every test that trains models or runs the scripts."""
    for item in items:
        if TRAINED_ROOTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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

    from histoshift.stages.prepare import prepare
    from histoshift.data.folds import write_folds

    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(demo_root / "input", root / "input")
    index = prepare(root / "input", root / "work" / "cache")
    write_folds(index, root / "folds" / "folds.csv")
    return root


FROZEN = {"model": {"backbone": "test_efficientnet", "weights": "none", "input_size": 64, "kind": "feature"},
          "algorithm": {"name": "erm"}, "train": {"epochs": 2, "batch_size": 16, "target_batch_size": 8}}


@pytest.fixture(scope="session")
def finished_template(prepared_root, tmp_path_factory):
    """Built once per test session: a root with one finished head-on-features member on every fold,
    inferred, stacked and submitted (tests get a copy each: `finished`)."""
    base = tmp_path_factory.mktemp("finished")
    root = base / "root"
    shutil.copytree(prepared_root, root)
    (base / "head.yaml").write_text(yaml.safe_dump(FROZEN))
    r = ["--root", str(root)]
    assert _main(r + ["train", "--config", str(base / "head.yaml")]) == 0
    assert _main(r + ["infer"]) == 0 and _main(r + ["stack"]) == 0
    assert _main(r + ["submit", "--allow-degenerate"]) == 0  # tiny random models
    return root


@pytest.fixture
def finished(finished_template, tmp_path):
    """A copy of `finished_template` for one test to change (file times kept: the cache stays current),
    with the member's config at tmp_path/head.yaml."""
    root = tmp_path / "root"
    shutil.copytree(finished_template, root, symlinks=True)
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(FROZEN))
    return root


IMAGE = {"model": {"backbone": "test_efficientnet", "weights": "none", "input_size": 64},
         "algorithm": {"name": "erm"}, "train": {"epochs": 1, "batch_size": 16, "target_batch_size": 8}}


@pytest.fixture(scope="session")
def pipeline_template(prepared_root, tmp_path_factory):
    """Built once per test session: a root with one finished fine-tuned (image) member, inferred."""
    base = tmp_path_factory.mktemp("img")
    root = base / "img"
    shutil.copytree(prepared_root, root)
    (base / "img.yaml").write_text(yaml.safe_dump(IMAGE))
    r = ["--root", str(root)]
    assert _main(r + ["train", "--config", str(base / "img.yaml"), "--fold", "0"]) == 0
    assert _main(r + ["infer"]) == 0
    return root


@pytest.fixture
def pipeline_root(pipeline_template, tmp_path):
    """A copy of `pipeline_template` for one test to change, its config at tmp_path/img.yaml."""
    root = tmp_path / "img"
    shutil.copytree(pipeline_template, root, symlinks=True)
    (tmp_path / "img.yaml").write_text(yaml.safe_dump(IMAGE))
    return root


def _main(argv) -> int:
    from histoshift.cli import main

    return main(argv)
