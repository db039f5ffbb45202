"""The competition's HDF5 contract and its validation.

Each file holds one top-level group per image id (the string of an integer) with
  img       3 x S x S, S in {96, 98}; float in [0, 1] or uint8 in [0, 255]
  label     scalar 0/1 (meaningless in test.h5)
  metadata  1-d array whose first element is the center
Everything that breaks the contract raises `InputError` naming the file, the id and the problem.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..errors import HistoshiftError

ALLOWED_SIDES = (96, 98)
FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding noise, not more


class InputError(HistoshiftError, ValueError):
    """The competition files break the contract; the message names file, id and problem."""


@dataclass
class Record:
    id: int
    img: np.ndarray  # S x S x 3 uint8 (HWC, ready for the cache)
    label: int
    center: int


@contextmanager
def structure(path: Path, key: str | None = None):
    """HDF5 damage inside a file (bytes overwritten in its B-trees, heaps or object headers; the size kept) as one
    line naming the file and the id: h5py raises RuntimeError, KeyError or OSError there, with no file name."""
    try:
        yield
    except InputError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        first = (str(e).strip("'\"").splitlines() or [type(e).__name__])[0]
        where = f", id {key}" if key is not None else ""
        raise InputError(f"{path}{where}: the HDF5 file is damaged inside ({type(e).__name__}: {first}); copy it "
                         "again from its source") from None


def open_h5(path: Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: cannot be read as HDF5 ({e})") from None
    try:
        with structure(path):
            empty = len(f.keys()) == 0
    except InputError:
        f.close()
        raise
    if empty:
        f.close()
        raise InputError(f"{path}: file is empty (no image groups)")
    return f


def list_ids(path: Path) -> list[int]:
    """The integer ids of a file, in sorted order, with names validated (cheap: reads no images)."""
    return [_parse_id(path, k) for k in sorted_keys(path)]


def sorted_keys(path: Path) -> list[str]:
    """The group names of a file in id order, every name validated."""
    with open_h5(path) as f, structure(path):
        return sorted(f.keys(), key=lambda k: _parse_id(path, k))


def check_structure(path: Path) -> int:
    """The number of image groups, after reading every object's header (HDF5's own visit: no pixels, about 17 us a
    group, 4 s for the competition's 220k patches; opening the groups one by one from Python costs 150 us): what
    preflight reads to notice a file damaged inside before an hour of work. When the visit fails, the groups are
    opened one by one to name the first damaged id."""
    keys = sorted_keys(path)
    with open_h5(path) as f:
        try:
            h5py.h5o.visit(f.id, lambda name: None)
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            for key in keys:
                with structure(path, key):
                    item = f[key]
                    for name in ("img", "label", "metadata") if isinstance(item, h5py.Group) else ():
                        if name in item:
                            item[name].id
            with structure(path):
                raise e
    return len(keys)


ID_PATTERN = re.compile(r"0|[1-9][0-9]*")  # ASCII digits only, no leading zero (007 and 7 would collide)
MAX_ID = 2**63 - 1


def _parse_id(path: Path, key: str) -> int:
    if not ID_PATTERN.fullmatch(key) or int(key) > MAX_ID:
        raise InputError(f"{path}, id {key!r}: group name is not an integer id "
                         "(ASCII digits without leading zeros, at most 2^63-1)")
    return int(key)


def to_uint8_hwc(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """Validate one `img` dataset and return it as S x S x 3 uint8."""
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] not in ALLOWED_SIDES:
        raise InputError(
            f"{path}, id {key}: img has shape {arr.shape}, expected (3, S, S) with S in {ALLOWED_SIDES}"
        )
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{path}, id {key}: img holds NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
            raise InputError(
                f"{path}, id {key}: float img values span [{lo:.4g}, {hi:.4g}], expected [0, 1]"
            )
        out = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise InputError(f"{path}, id {key}: img has dtype {arr.dtype}, expected a float type or uint8")
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _scalar(path: Path, key: str, name: str, raw: np.ndarray, expected: str):
    """The first element of a numeric dataset (a string or object value is refused, not coerced)."""
    if raw.size == 0:
        raise InputError(f"{path}, id {key}: {name} is empty, expected {expected}")
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        shown = raw.reshape(-1)[0]
        shown = shown.decode(errors="replace") if isinstance(shown, bytes) else shown
        raise InputError(f"{path}, id {key}: {name} holds {shown!r} of type {raw.dtype}, expected {expected}")
    return raw.reshape(-1)[0]


def _read_label(path: Path, key: str, group: h5py.Group, labelled: bool) -> int:
    if not labelled:
        return -1
    raw = np.asarray(group["label"][()])
    if raw.size != 1:
        raise InputError(f"{path}, id {key}: label has shape {raw.shape}, expected a scalar")
    value = _scalar(path, key, "label", raw, "0 or 1")
    if not np.isfinite(value) or float(value) not in (0.0, 1.0):
        raise InputError(f"{path}, id {key}: label is {value.item()!r}, expected 0 or 1")
    return int(value)


def _read_center(path: Path, key: str, group: h5py.Group) -> int:
    raw = np.asarray(group["metadata"][()])
    center = _scalar(path, key, "metadata", raw, "the center as its first element (a non-negative integer)")
    if not np.isfinite(center) or float(center) != int(center) or int(center) < 0:
        raise InputError(
            f"{path}, id {key}: metadata[0] (center) is {center.item()!r}, expected a non-negative integer"
        )
    return int(center)


def read_record(path: Path, f: h5py.File, key: str, labelled: bool) -> Record:
    """One validated group of an open file."""
    with structure(path, key):
        return _read_record(path, f, key, labelled)


def _read_record(path: Path, f: h5py.File, key: str, labelled: bool) -> Record:
    item = f[key]
    if not isinstance(item, h5py.Group):
        raise InputError(f"{path}, id {key}: expected a group holding img/label/metadata, found a dataset")
    for required in ("img", "label", "metadata"):
        if required not in item:
            raise InputError(f"{path}, id {key}: missing key '{required}'")
    return Record(id=_parse_id(path, key), img=to_uint8_hwc(path, key, np.asarray(item["img"][()])),
                  label=_read_label(path, key, item, labelled), center=_read_center(path, key, item))


def iter_records(path: Path, labelled: bool) -> Iterator[Record]:
    """Yield validated records in sorted-id order. `labelled=False` ignores the label's value."""
    path = Path(path)
    keys = sorted_keys(path)
    with open_h5(path) as f:
        for key in keys:
            yield read_record(path, f, key, labelled)


@dataclass
class Chunk:
    """Consecutive records of one file as arrays (what `prepare`'s reader processes return)."""
    ids: np.ndarray  # int64
    images: np.ndarray  # N x S x S x 3 uint8
    labels: np.ndarray  # int64 (-1 when unlabelled)
    centers: np.ndarray  # int64


def read_chunk(path: Path, keys: list[str], labelled: bool) -> Chunk:
    """The records `keys` of one file, validated, as one Chunk (its images share one side)."""
    path = Path(path)
    with open_h5(path) as f:
        records = [read_record(path, f, key, labelled) for key in keys]
    side = records[0].img.shape[0]
    for r in records:
        if r.img.shape[0] != side:
            raise InputError(f"{path}, id {r.id}: img side {r.img.shape[0]} differs from the {side} seen before")
    return Chunk(ids=np.array([r.id for r in records], dtype=np.int64), images=np.stack([r.img for r in records]),
                 labels=np.array([r.label for r in records], dtype=np.int64),
                 centers=np.array([r.center for r in records], dtype=np.int64))
