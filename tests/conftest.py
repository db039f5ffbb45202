"""Shared fixtures: tiny datasets in the competition layout generated per test session, finished roots built once
and copied per test, an offline hub cache. Helpers that are not fixtures: helpers.py.

The quick tier (`-m "not slow"`, under a minute) is chosen by the `slow` marker alone; a test that uses a
fixture which trains models must carry it (collection fails otherwise, naming the test).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TQDM_DISABLE", "1")

from histoshift.cli import cpu_allocator_defaults  # noqa: E402 - torch-free

cpu_allocator_defaults()  # as the command does, before torch is imported; the stages the tests start inherit it

from helpers import FROZEN, IMAGE  # noqa: E402 - after the environment above


TRAINED_ROOTS = {"finished", "pipeline_root"}  # fixtures that train models (minutes on 2 cores)


def pytest_collection_modifyitems(items):
    """A test on a trained root without the slow marker would drag training into the quick tier: refused."""
    unmarked = [item.nodeid for item in items if TRAINED_ROOTS & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"mark these @pytest.mark.slow (they train models through a fixture): {unmarked}")


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


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache that the hub client reads (offline, as every test runs)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE
    return cache
