"""A small synthetic dataset in exactly the competition's HDF5 layout, for the offline demo and tests.

Patches are drawn in H&E stain-concentration space: eosin-stained stroma with white gaps, and
hematoxylin-stained nuclei. Normal patches (label 0) hold many small, round, dense nuclei
(lymphocytes); tumour patches (label 1) hold larger, irregular, paler nuclei with coarse chromatin.
Each center renders the same kind of tissue with its own stain strength and brightness, so a model
trained on some centers meets a real colour shift on the others. A few aberrant patches (black
scanner blocks, blank white) are mixed in. This is NOT real tissue: use it to check that the
pipeline works, not how well a model does on histology.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..safeio import atomic, write_text
from ..stain.hed import RGB_FROM_HED

# center -> (hematoxylin scale, eosin scale, brightness gain)
CENTER_STAIN = {0: (1.00, 1.00, 1.00), 3: (0.80, 1.25, 0.97), 4: (1.20, 0.80, 1.03),
                1: (0.70, 1.35, 0.95), 2: (1.40, 0.70, 1.02)}
SPLIT_CENTERS = {"train": (0, 3, 4), "val": (1,), "test": (2,)}


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells))
    reps = -(-side // cells)
    up = np.kron(coarse, np.ones((reps, reps)))[:side, :side]
    k = np.ones(reps) / reps  # box blur rows then columns
    up = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 0, up)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, up)


def render_patch(rng: np.random.Generator, label: int, center: int, side: int = 96) -> np.ndarray:
    """One 3 x side x side float32 patch in [0, 1]."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    tissue = _smooth_noise(rng, side, 6) > rng.uniform(0.15, 0.35)
    eosin = (0.25 + 0.25 * _smooth_noise(rng, side, 12)) * tissue
    hema = np.zeros((side, side), np.float32)
    # each nucleus is tumour-like with a probability that overlaps between the classes
    tumour_share = rng.uniform(0.0, 0.3) if label == 0 else rng.uniform(0.35, 1.0)
    n = int(rng.integers(35, 60) * (1 - tumour_share) + rng.integers(10, 20) * tumour_share)
    for _ in range(n):
        big = rng.random() < tumour_share
        radius, density = ((4.5, 8.0), (0.45, 0.75)) if big else ((1.8, 3.0), (0.9, 1.2))
        cy, cx = rng.uniform(0, side, 2)
        r = rng.uniform(*radius)
        ecc = rng.uniform(1.0, 1.9 if big else 1.25)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (r * ecc)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
        inside = u * u + v * v <= 1.0
        hema[inside] = (
            rng.uniform(*density) * (0.7 + 0.6 * rng.random(int(inside.sum()))) if big else rng.uniform(*density)
        )
    return _stain(rng, hema, eosin, center)


def _stain(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray, center: int) -> np.ndarray:
    h_scale, e_scale, gain = CENTER_STAIN.get(center, (1.0, 1.0, 1.0))
    conc = np.stack([hema * h_scale, eosin * e_scale, np.full_like(hema, 0.02)], axis=-1)
    rgb = np.exp(-(conc @ RGB_FROM_HED.astype(np.float32)) * 2.3) * gain
    rgb += rng.normal(0, 0.01, rgb.shape)
    return np.clip(rgb, 0, 1).astype(np.float32).transpose(2, 0, 1)


def _aberrant(rng: np.random.Generator, img: np.ndarray, kind: str) -> np.ndarray:
    img = img.copy()
    if kind == "black":  # a scanner artefact: a black block well over 200 pixels
        s = int(rng.integers(18, 30))
        y, x = rng.integers(0, img.shape[1] - s, 2)
        img[:, y:y + s, x:x + s] = 0.0
    else:  # blank: (almost) pure white
        img[:] = 1.0
    return img


def make_demo(out_dir: Path, per_center: int = 160, test_size: int = 240, n_aberrant: int = 3,
              seed: int = 0, dtype: str = "float32") -> Path:
    """Write train.h5 / val.h5 / test.h5 (+ test_labels.csv for scoring) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {c: per_center for c in (0, 1, 3, 4)} | {2: test_size}
    ids = iter(rng.permutation(20 * sum(sizes.values()))[: sum(sizes.values())] + 100)
    test_labels = []
    for split, centers in SPLIT_CENTERS.items():
        path = out_dir / f"{split}.h5"
        with atomic(path) as tmp, h5py.File(tmp, "w") as f:
            for center in centers:
                n = sizes[center]
                labels = rng.permutation(np.arange(n) % 2)
                bad = set(rng.choice(n, size=min(n_aberrant, n), replace=False).tolist()) if split != "val" else set()
                for k in range(n):
                    img = render_patch(rng, int(labels[k]), center)
                    if k in bad:
                        img = _aberrant(rng, img, "black" if len(bad) < 2 or k != max(bad) else "white")
                    i = next(ids)
                    g = f.create_group(str(i))
                    g["img"] = img if dtype == "float32" else np.rint(img * 255).astype(np.uint8)
                    g["label"] = np.int64(labels[k]) if split != "test" else np.int64(0)
                    g["metadata"] = np.array([center, k], dtype=np.int64)
                    if split == "test":
                        test_labels.append((i, int(labels[k])))
    write_text(out_dir / "test_labels.csv", "ID,label\n" + "".join(f"{i},{y}\n" for i, y in test_labels))
    return out_dir
