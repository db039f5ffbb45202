"""The competition's HDF5 contract and its validation.

Each file holds one top-level group per image id (the string of an integer) with
  img       3 x S x S, S in {96, 98}; float in [0, 1] or uint8 in [0, 255]
  label     scalar 0/1 (meaningless in test.h5)
  metadata  1-d array whose first element is the center
Everything that breaks the contract raises `InputError` naming the file, the id and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

ALLOWED_SIDES = (96, 98)
FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding noise, not more


class InputError(ValueError):
    """The competition files break the contract; the message names file, id and problem."""


@dataclass
class Record:
    id: int
    img: np.ndarray  # S x S x 3 uint8 (HWC, ready for the cache)
    label: int
    center: int


def open_h5(path: Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: cannot be read as HDF5 ({e})") from None
    if len(f.keys()) == 0:
        f.close()
        raise InputError(f"{path}: file is empty (no image groups)")
    return f


def list_ids(path: Path) -> list[int]:
    """The integer ids of a file, in sorted order, with names validated (cheap: reads no images)."""
    with open_h5(path) as f:
        return sorted(_parse_id(path, k) for k in f.keys())


def _parse_id(path: Path, key: str) -> int:
    if not key.isdigit():
        raise InputError(f"{path}, id '{key}': group name is not an integer id")
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


def _read_label(path: Path, key: str, group: h5py.Group, labelled: bool) -> int:
    raw = np.asarray(group["label"][()])
    if not labelled:
        return -1
    if raw.size != 1:
        raise InputError(f"{path}, id {key}: label has shape {raw.shape}, expected a scalar")
    value = raw.reshape(-1)[0]
    if not np.isfinite(value) or float(value) not in (0.0, 1.0):
        raise InputError(f"{path}, id {key}: label is {value.item()!r}, expected 0 or 1")
    return int(value)


def _read_center(path: Path, key: str, group: h5py.Group) -> int:
    meta = np.asarray(group["metadata"][()]).reshape(-1)
    if meta.size == 0:
        raise InputError(f"{path}, id {key}: metadata is empty, expected the center as its first element")
    center = meta[0]
    if not np.isfinite(center) or float(center) != int(center) or int(center) < 0:
        raise InputError(f"{path}, id {key}: metadata[0] (center) is {center.item()!r}, expected a non-negative integer")
    return int(center)


def iter_records(path: Path, labelled: bool) -> Iterator[Record]:
    """Yield validated records in sorted-id order. `labelled=False` ignores the label's value."""
    path = Path(path)
    with open_h5(path) as f:
        keys = sorted(f.keys(), key=lambda k: _parse_id(path, k))
        for key in keys:
            item = f[key]
            if not isinstance(item, h5py.Group):
                raise InputError(f"{path}, id {key}: expected a group holding img/label/metadata, found a dataset")
            for required in ("img", "label", "metadata"):
                if required not in item:
                    raise InputError(f"{path}, id {key}: missing key '{required}'")
            img = to_uint8_hwc(path, key, np.asarray(item["img"][()]))
            yield Record(
                id=_parse_id(path, key),
                img=img,
                label=_read_label(path, key, item, labelled),
                center=_read_center(path, key, item),
            )
