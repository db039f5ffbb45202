"""The competition's HDF5 contract: what is accepted and every bad input's message."""
from __future__ import annotations


import h5py
import numpy as np
import pytest

from helpers import random_items, write_h5
from histoshift.data.cache import check_inputs
from histoshift.stages.prepare import prepare
from histoshift.lineage import StaleError
from histoshift.data.h5_reader import InputError, iter_records


def _three_files(tmp_path, rng, side=96, dtype=np.float32):
    d = tmp_path / "input"
    d.mkdir()
    write_h5(d / "train.h5", random_items(rng, [10, 11, 12], 0, side) | random_items(rng, [13, 14], 3, side), dtype)
    write_h5(d / "val.h5", random_items(rng, [20, 21], 1, side), dtype)
    write_h5(d / "test.h5", random_items(rng, [30, 31, 32], 2, side), dtype)
    return d


def test_float_and_uint8_images_are_accepted_and_converted_exactly(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((3, 96, 96)).astype(np.float32)
    write_h5(tmp_path / "f.h5", {5: (img, 1, 0)})
    write_h5(tmp_path / "u.h5", {5: (np.rint(img * 255).astype(np.uint8), 1, 0)}, dtype=None)
    (rf,), (ru,) = list(iter_records(tmp_path / "f.h5", True)), list(iter_records(tmp_path / "u.h5", True))
    assert rf.img.shape == (96, 96, 3) and rf.img.dtype == np.uint8
    np.testing.assert_array_equal(rf.img, ru.img)
    np.testing.assert_array_equal(rf.img[..., 0], np.rint(img[0] * 255))
    assert (rf.id, rf.label, rf.center) == (5, 1, 0)


def test_98_pixel_sides_are_accepted(tmp_path):
    d = _three_files(tmp_path, np.random.default_rng(1), side=98)
    index = prepare(d, tmp_path / "cache")
    assert np.load(tmp_path / "cache" / "images_train.npy").shape == (5, 98, 98, 3)
    assert len(index) == 10


def test_test_labels_are_ignored(tmp_path):
    rng = np.random.default_rng(2)
    write_h5(tmp_path / "t.h5", {1: (rng.random((3, 96, 96)), 7, 2)})  # label 7 would be invalid in train
    assert next(iter_records(tmp_path / "t.h5", labelled=False)).label == -1
    with pytest.raises(InputError, match=r"t\.h5, id 1: label is 7"):
        list(iter_records(tmp_path / "t.h5", labelled=True))


def _bad(tmp_path, mutate):
    path = tmp_path / "bad.h5"
    rng = np.random.default_rng(3)
    write_h5(path, random_items(rng, [41, 42], 0))
    with h5py.File(path, "a") as f:
        mutate(f)
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f["42"].__delitem__("img"), r"bad\.h5, id 42: missing key 'img'"),
    (lambda f: f["42"].__delitem__("label"), r"bad\.h5, id 42: missing key 'label'"),
    (lambda f: f["42"].__delitem__("metadata"), r"bad\.h5, id 42: missing key 'metadata'"),
    (lambda f: (f["42"].__delitem__("img"), f["42"].create_dataset("img", data=np.zeros((3, 64, 64), np.float32))),
     r"bad\.h5, id 42: img has shape \(3, 64, 64\)"),
    (lambda f: (f["42"].__delitem__("img"), f["42"].create_dataset("img", data=np.zeros((96, 96, 3), np.float32))),
     r"bad\.h5, id 42: img has shape \(96, 96, 3\)"),
    (lambda f: (f["42"].__delitem__("img"), f["42"].create_dataset("img", data=np.zeros((3, 96, 96), np.int32))),
     r"bad\.h5, id 42: img has dtype int32"),
    (lambda f: f["42"]["img"].__setitem__((0, 0, 0), np.nan), r"bad\.h5, id 42: img holds NaN or inf"),
    (lambda f: f["42"]["img"].__setitem__((1, 5, 5), np.inf), r"bad\.h5, id 42: img holds NaN or inf"),
    (lambda f: f["42"]["img"].__setitem__((1, 5, 5), 3.0), r"bad\.h5, id 42: float img values span"),
    (lambda f: f.create_group("abc"), r"bad\.h5, id 'abc': group name is not an integer id"),
    (lambda f: (f["42"].__delitem__("metadata"), f["42"].create_dataset("metadata", data=np.zeros(0))),
     r"bad\.h5, id 42: metadata is empty"),
])
def test_bad_items_name_file_id_and_problem(tmp_path, mutate, message):
    path = _bad(tmp_path, mutate)
    with pytest.raises(InputError, match=message):
        list(iter_records(path, labelled=True))


def test_missing_file(tmp_path):
    d = _three_files(tmp_path, np.random.default_rng(4))
    (d / "val.h5").unlink()
    with pytest.raises(InputError, match=r"val\.h5: file not found"):
        prepare(d, tmp_path / "cache")


def test_empty_file(tmp_path):
    d = _three_files(tmp_path, np.random.default_rng(5))
    h5py.File(d / "test.h5", "w").close()
    with pytest.raises(InputError, match=r"test\.h5: file is empty"):
        prepare(d, tmp_path / "cache")


def test_unreadable_file(tmp_path):
    d = _three_files(tmp_path, np.random.default_rng(6))
    (d / "train.h5").write_bytes(b"this is not an HDF5 file")
    with pytest.raises(InputError, match=r"train\.h5: cannot be read as HDF5"):
        prepare(d, tmp_path / "cache")


def test_duplicate_id_across_files(tmp_path):
    rng = np.random.default_rng(7)
    d = _three_files(tmp_path, rng)
    write_h5(d / "test.h5", random_items(rng, [30, 11], 2))  # 11 is also in train.h5
    with pytest.raises(InputError, match=r"test\.h5, id 11: duplicate id, already present in .*train\.h5"):
        prepare(d, tmp_path / "cache")


def test_mixed_sides_rejected(tmp_path):
    rng = np.random.default_rng(8)
    d = _three_files(tmp_path, rng)
    write_h5(d / "val.h5", random_items(rng, [20], 1, side=98))
    with pytest.raises(InputError, match=r"val\.h5, id 20: img side 98 differs from the 96"):
        prepare(d, tmp_path / "cache")


def test_a_failed_prepare_keeps_the_previous_cache_and_leaves_nothing_half_built(tmp_path):
    """The new cache is built beside the old one: a bad file stops prepare, the old cache stays whole
    (manifest, arrays) and later stages are told that the inputs changed since it was built."""
    rng = np.random.default_rng(9)
    d = _three_files(tmp_path, rng)
    prepare(d, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    with h5py.File(d / "train.h5", "a") as f:
        f["12"]["img"][0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"train\.h5, id 12: img holds NaN"):
        prepare(d, tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.building")] == []
    with pytest.raises(
        StaleError, match=r"train\.h5 changed since the cache was built \(size or modification time\); run prepare"
    ):
        check_inputs(d, tmp_path / "cache")
