"""`accelerate launch` with 2 CPU processes (gloo): training works, and inference gathers every id
exactly once with the same logits as 1 process, even when the last batch is padded."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from histoshift.cli import main
from histoshift.runs import find_runs

from helpers import tiny_config

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = {
    **tiny_config(algorithm={"name": "dann"}, aug={"backend": "torch"},
                  train={"batch_size": 8, "target_batch_size": 4, "num_workers": 0, "eval_batch_size": 7}),
}


def _launch(root, *args):
    env = {**os.environ, "PYTHONPATH": str(SRC), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "histoshift", "--root", str(root), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_match_one(prepared_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(prepared_root, root)
    cfg = tmp_path / "tiny_mp.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    log = _launch(root, "train", "--config", str(cfg), "--fold", "1,3")
    assert "held-out center 1" in log
    runs = find_runs(root / "work" / "runs")
    assert [r.fold for r in runs] == [1, 3]
    folds = pd.read_csv(root / "folds" / "folds.csv")
    for run in runs:  # out-of-fold predictions written once, every held-out id exactly once
        oof = pd.read_csv(run.oof)
        assert oof.id.is_unique and set(oof.id) == set(folds[folds.fold == run.fold].id)
        assert len(run.metrics.read_text().splitlines()) == 1

    assert main(["--root", str(root), "infer"]) == 0  # one process
    single = {r.name: (pd.read_csv(r.tta.heldout), pd.read_csv(r.tta.test)) for r in runs}
    _launch(root, "infer", "--force")
    for run in runs:
        for one, path in zip(single[run.name], (run.tta.heldout, run.tta.test)):
            two = pd.read_csv(path)
            assert two.id.is_unique and len(two) == len(one)  # 30 test ids: batches of 7 over 2 processes pad
            merged = one.merge(two, on=["id", "center", "label"], suffixes=("_1", "_2"))
            assert len(merged) == len(one)
            for k in range(8):
                pd.testing.assert_series_equal(
                    merged[f"v{k}_1"], merged[f"v{k}_2"], check_names=False, atol=1e-4, rtol=1e-4
                )


@pytest.mark.slow
def test_two_processes_embed_the_same_store_as_one(prepared_root, tmp_path):
    """`accelerate launch` with 2 processes shards the store's chunks (16 rows each here: several a split, so both
    processes write into the same memory-mapped files): every array and every chunk marker byte for byte as one
    process writes them (the embeddings writer of eva broke exactly there)."""
    cfg = tmp_path / "head.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config("feature", model={"feature_hed_views": 2})))
    stores = {}
    for n in (1, 2):
        root = tmp_path / f"root{n}"
        shutil.copytree(prepared_root, root)
        env = {**os.environ, "HISTOSHIFT_CHUNK_ROWS": "16"}
        if n == 1:
            proc = subprocess.run(
                [sys.executable, "-m", "histoshift", "--root", str(root), "embed", "--config", str(cfg)],
                env={**env, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            os.environ["HISTOSHIFT_CHUNK_ROWS"] = "16"
            try:
                log = _launch(root, "embed", "--config", str(cfg))
            finally:
                del os.environ["HISTOSHIFT_CHUNK_ROWS"]
        (store,) = [p for p in (root / "work" / "features").iterdir() if p.is_dir()]
        stores[n] = store
    one, two = stores[1], stores[2]
    shares = [int(m) for m in re.findall(r"embed: process [12] of 2 embedded (\d+) images", log)]
    images = sum(
        int(np.prod(np.load(one / f"features_{s}.npy", mmap_mode="r").shape[:2])) for s in ("train", "val", "test")
    )
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == images, (shares, images)  # each rank its share
    assert one.name == two.name
    marks = sorted(p.name for p in (one / "progress").iterdir())
    assert len([m for m in marks if m.startswith("train-")]) >= 4  # several chunks: both processes wrote
    assert marks == sorted(p.name for p in (two / "progress").iterdir())
    for name in marks:
        assert (one / "progress" / name).read_text() == (two / "progress" / name).read_text(), name
    for split in ("train", "val", "test"):
        assert (one / f"features_{split}.npy").read_bytes() == (two / f"features_{split}.npy").read_bytes(), split
