"""prepare (cache, idempotence), the aberrant-patch filter and the leave-one-center-out folds."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from helpers import random_items, write_h5
from histoshift.data.cache import Cache
from histoshift.stages.prepare import prepare
from histoshift.data.folds import read_folds, write_folds
from histoshift.data.quality import QualityRule, measure
from histoshift.data.splits import split_for_fold


def test_cache_layout_and_index(prepared_root):
    cache = Cache.open(prepared_root / "work" / "cache")
    idx = cache.index
    assert list(idx.columns[:5]) == ["id", "split", "row", "center", "label"]
    assert {"n_black", "n_white", "aberrant"} <= set(idx.columns)
    assert sorted(idx[idx.split == "train"].center.unique()) == [0, 3, 4]
    assert set(idx[idx.split == "val"].center) == {1} and set(idx[idx.split == "test"].center) == {2}
    assert (idx[idx.split == "test"].label == -1).all()
    assert idx.id.is_unique
    for split in ("train", "val", "test"):
        arr = cache.images(split, in_memory=False)
        assert arr.dtype == np.uint8 and arr.shape[1:] == (96, 96, 3)
        assert len(arr) == (idx.split == split).sum()


def test_cache_rows_match_the_h5_images(prepared_root):
    import h5py

    cache = Cache.open(prepared_root / "work" / "cache")
    row = cache.index[cache.index.split == "val"].iloc[5]
    with h5py.File(prepared_root / "input" / "val.h5") as f:
        want = np.rint(f[str(row.id)]["img"][()] * 255).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(cache.gather(cache.index[cache.index.id == row.id])[0], want)


def test_prepare_is_idempotent_and_notices_changed_inputs(demo_root, tmp_path, capsys):
    shutil.copytree(demo_root / "input", tmp_path / "input")
    prepare(tmp_path / "input", tmp_path / "cache")
    stamp = os.stat(tmp_path / "cache" / "images_train.npy").st_mtime_ns
    capsys.readouterr()
    prepare(tmp_path / "input", tmp_path / "cache")
    assert "up to date" in capsys.readouterr().out
    assert os.stat(tmp_path / "cache" / "images_train.npy").st_mtime_ns == stamp
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "input" / "val.h5", random_items(rng, [999991, 999992], 1))
    index = prepare(tmp_path / "input", tmp_path / "cache")
    assert sorted(index[index.split == "val"].id) == [999991, 999992]


def test_quality_flags_black_white_and_flat():
    rng = np.random.default_rng(0)
    imgs = rng.integers(30, 220, (5, 96, 96, 3), dtype=np.uint8)
    imgs[1, :15, :14] = 0  # 210 black pixels -> aberrant
    imgs[2, :10, :10] = 0  # 100 black pixels -> clean
    imgs[3] = 255  # blank white
    imgs[4] = 128  # flat grey
    q = measure(imgs, QualityRule())
    assert q["n_black"].tolist() == [0, 210, 100, 0, 0]
    assert q["aberrant"].tolist() == [False, True, False, True, True]
    assert q["reason"].tolist() == ["", "black", "", "white", "flat"]
    assert q["n_white"][3] == 96 * 96


def test_demo_aberrant_patches_are_flagged_and_reported(prepared_root):
    idx = Cache.open(prepared_root / "work" / "cache").index
    flagged = idx[idx.aberrant]
    assert set(flagged.reason) == {"black", "white"}
    assert set(flagged.split) == {"train", "test"}
    report = pd.read_csv(prepared_root / "work" / "cache" / "quality_report.csv")
    assert report.set_index("center").loc[0, "aberrant"] == 2


def test_folds_leave_one_center_out(prepared_root):
    folds = read_folds(prepared_root / "folds" / "folds.csv")
    assert list(folds.columns) == ["id", "center", "label", "fold"]
    assert sorted(folds.fold.unique()) == [0, 1, 3, 4]
    assert (folds.fold == folds.center).all()
    index = Cache.open(prepared_root / "work" / "cache").index
    for k in folds.fold.unique():
        source, heldout, target = split_for_fold(index, folds, k)
        assert k not in set(source.center), "a center is both trained on and held out"
        assert set(heldout.center) == {k}
        assert set(target.center) == {k, 2}
        assert not source.aberrant.any() and not target.aberrant.any()
        assert set(source.id).isdisjoint(heldout.id)


def test_folds_are_written_once(prepared_root, tmp_path, capsys):
    index = Cache.open(prepared_root / "work" / "cache").index
    path = tmp_path / "folds.csv"
    write_folds(index, path)
    first = path.read_bytes()
    write_folds(index, path)
    assert path.read_bytes() == first and "up to date" in capsys.readouterr().out
    changed = index[index.id != index[index.split == "val"].id.iloc[0]]
    with pytest.raises(FileExistsError, match="differs"):
        write_folds(changed, path)
    assert path.read_bytes() == first
    write_folds(changed, path, force=True)
    kept = [p for p in tmp_path.iterdir() if p.name != "folds.csv"]
    assert len(kept) == 1 and kept[0].read_bytes() == first
