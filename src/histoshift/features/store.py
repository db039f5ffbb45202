"""The feature store of a fixed backbone (work/features/<key>/) and what identifies it.

features_<split>.npy holds N x V x D float16 rows in the cache's order; meta.json (written last) everything the
features were computed from. <key> is a readable prefix plus a hash of that spec (`feature_spec`): the backbone (a
foundation recipe with every field, or timm name + kwargs), the weights' identity (hub commit, or a local copy's
files), the precision in effect, the views, the HED setting, the colour settings (stain normalisation, the stain
GAN's generator, grayscale) and the cache's content digest (its id). Change any of them and a new store is
embedded; nothing stale is reused. `store_settings` is the config's part of that spec: preflight groups configs
by it (two heads on one backbone share one store) before any weights or cache exist.

Files are input: each chunk's marker holds its checksum (blake2b of the stored rows), checked whenever the store
is opened for training or prediction (`bad_chunks`); runs record the store's content stamp (a hash of those
checksums), so features that changed make them stale, never silently reused.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config
from ..data.cache import LABELLED, SPLITS
from ..errors import HistoshiftError
from ..safeio import DiskError, open_npy, reserve_npy, write_text
from ..verified import Record, identity
from .rows import NpyRows, TableRows

# rows per resumable unit (fixed: a resumed run finds the same chunks; a store embedded with another value
# re-embeds, its markers being named by row). HISTOSHIFT_CHUNK_ROWS sets it for tests and benchmarks that need
# many chunks of a small store (two processes sharding them, resume points).
CHUNK_ROWS = int(os.environ.get("HISTOSHIFT_CHUNK_ROWS", "2048"))


def store_settings(cfg: Config, precision: str) -> dict:
    """The config's part of a store's spec: the backbone as configured, the weights as written, the views and
    the colour settings (with the stain GAN's settings, which key its generator). Two configs that differ here
    never share a store; preflight groups configs by it."""
    m = cfg.model
    gan = cfg.stain_gan.model_dump(exclude={"checkpoint_every"}) if cfg.aug.stain_norm == "gan" else None
    return {"backbone": {"recipe": m.recipe, "recipe_overrides": m.recipe_overrides} if m.recipe else
            {"timm": m.backbone, "timm_kwargs": m.timm_kwargs, "input_size": m.input_size},
            "weights": m.weights, "precision": precision, "views": m.feature_views, "hed_views": m.feature_hed_views,
            "hed_sigma": m.feature_hed_sigma if m.feature_hed_views else None, "stain_norm": cfg.aug.stain_norm,
            "grayscale": cfg.aug.grayscale, "stain_gan": gan,
            **({"robustify": m.robustify.model_dump()} if m.robustify is not None else {})}


def feature_spec(cfg: Config, cache, precision: str, gan: str | None = None, robust: dict | None = None) -> dict:
    """Everything that changes the stored features (the store key hashes it): `store_settings` with the
    backbone resolved (every recipe field, the weights' identity; `robust`: the tuned backbone's identity, needed
    with model.robustify), the trained stain GAN's identity (`gan`, needed when aug.stain_norm is gan) and the
    cache's id."""
    from ..models.robust import backbone_identity

    s, m = store_settings(cfg, precision), cfg.model
    backbone = backbone_identity(m)
    if m.robustify is not None:
        if robust is None:
            raise ValueError("feature_spec: model.robustify needs the tuned backbone's identity")
        backbone["robustify"] = robust
    if s["stain_norm"] == "gan" and gan is None:
        raise ValueError("feature_spec: aug.stain_norm=gan needs the trained generator's identity")
    return {
        "backbone": backbone,
        "precision": precision,
        "views": s["views"],
        "hed_views": s["hed_views"],
        "hed_sigma": s["hed_sigma"],
        "stain_norm": s["stain_norm"],
        **({"grayscale": True} if s["grayscale"] else {}),
        **({"stain_gan": gan} if gan else {}),
        "cache": cache.id,
    }  # the cache's content digest (not where or when its files were made)


def fourier_spec(spec: dict, settings: dict) -> dict:
    """The spec of the store of a backbone's Fourier transfers (infer --fourier on a head): `spec`'s backbone,
    colour and cache, the donors as its views (no HED views), and the transfer's settings (beta, donors, pool)."""
    return {**spec, "views": settings["donors"], "hed_views": 0, "hed_sigma": None, "fourier": settings}


def store_key(spec: dict) -> str:
    b = spec["backbone"]
    name = (b["recipe"]["name"] if "recipe" in b else b["timm"]) + ("-robust" if "robustify" in b else "")
    name += f"-fourier-b{spec['fourier']['beta']:g}" if "fourier" in spec else ""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    hed = f"-hed{spec['hed_views']}" if spec["hed_views"] else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{spec['views']}v{hed}-{spec['precision']}-{digest}")


class FeatureError(HistoshiftError, ValueError):
    """Features that must not be stored or trained on (non-finite values from the backbone)."""


def chunk_digest(arr: np.ndarray, start: int) -> str:
    """The checksum of one chunk of stored rows (the bytes as stored, float16)."""
    return bytes_digest(np.ascontiguousarray(arr[start:start + CHUNK_ROWS]).tobytes())


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# The store's writer: the embed stage writes through it (and bench/scale.py, synthetic features at any size).
def begin_store(path: Path, spec: dict) -> None:
    (path / "progress").mkdir(parents=True, exist_ok=True)
    write_text(path / "spec.json", json.dumps(spec, indent=2, default=str))


def reserve_split(path: Path, split: str, shape: tuple) -> None:
    """features_<split>.npy with its space reserved on disk (a full disk is refused before any work)."""
    target = path / f"features_{split}.npy"
    if not target.exists():
        tmp = path / f"features_{split}.tmp.npy"
        reserve_npy(tmp, shape, np.float16, f"the {split} features").flush()
        tmp.replace(target)


def open_split(path: Path, split: str, shape: tuple) -> np.memmap:
    target = path / f"features_{split}.npy"
    arr = open_npy(target, "r+")  # never through a planted link
    if arr.shape != tuple(shape):
        raise RuntimeError(f"{target}: shape {arr.shape}, expected {tuple(shape)}; delete {path} and embed again")
    return arr


def write_chunk(path: Path, split: str, arr: np.memmap, start: int, rows: np.ndarray) -> None:
    """One chunk's rows, flushed, then its marker with their checksum (a chunk without one is embedded again)."""
    try:
        arr[start:start + len(rows)] = rows
        arr.flush()
        write_text(path / "progress" / f"{split}-{start}", chunk_digest(arr, start))  # after the rows
    except (OSError, DiskError) as e:  # the rows' space is reserved: a full disk meets the marker or the flush
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskError(
            f"{path / f'features_{split}.npy'}: disk full while storing rows {start}-{start + len(rows) - 1}"
            f" of {split}; free some space and run embed again (it resumes at this chunk)"
        ) from None


def finish_store(path: Path, meta: dict) -> None:
    write_text(path / "meta.json", json.dumps(meta, indent=2, default=str))  # written last: the store is complete


MARKER = re.compile(r"(train|val|test)-[0-9]+")  # a chunk's marker (a leftover temporary file is none)


class StoreDamage(FeatureError):
    """A part of the store that is not what was written (`part`: a split's file, or 'meta' for meta.json): the
    embed stage embeds that part again, alone."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


def unreadable(file: Path, e: OSError) -> HistoshiftError:
    """An error of the system, not of the bytes (permissions, EIO, too many open files): one line; nothing is
    deleted or embedded again for it."""
    return HistoshiftError(f"{file}: cannot be read now ({type(e).__name__}: {e.strerror or e}); nothing was deleted "
                           "or embedded again; fix the cause and run again")


def read_meta(path: Path) -> dict:
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
        meta["spec"]["views"]
        return meta
    except FileNotFoundError:
        raise StoreDamage(f"{file}: missing", "meta") from None
    except OSError as e:
        raise unreadable(file, e) from None
    except (ValueError, KeyError, TypeError) as e:
        raise StoreDamage(f"{file}: not the store's record ({type(e).__name__})", "meta") from None


class FeatureStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    @cached_property
    def meta(self) -> dict:
        return read_meta(self.path)

    @property
    def views(self) -> int:
        return self.meta["spec"]["views"]  # the TTA views every split has (labelled ones may have more)

    def array(self, split: str) -> np.ndarray:
        """A split's memory-mapped features; a file that is not the store's array (missing, truncated, its header
        overwritten, another file) is StoreDamage naming it; the system refusing the read is one line."""
        file = self.path / f"features_{split}.npy"
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise StoreDamage(f"{file}: missing", split) from None
        except (ValueError, EOFError) as e:
            raise StoreDamage(f"{file}: cannot be read as the store's features ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'damaged'})", split) from None
        except OSError as e:
            raise unreadable(file, e) from None
        if arr.ndim != 3 or arr.dtype != np.float16:
            raise StoreDamage(f"{file}: holds {arr.dtype} of shape {arr.shape}, not the store's N x V x D float16 "
                              "features", split)
        return arr

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return {split: self.array(split) for split in SPLITS}

    @cached_property
    def files(self) -> dict[str, NpyRows]:
        """Per split, its rows read from disk on demand (rows.py): what training, prediction and statistics read,
        so that memory is bounded by a batch or a chunk, never by the store."""
        return {s: NpyRows(a.filename, a.offset, a.shape, a.dtype) for s, a in self.arrays.items()}

    @property
    def dim(self) -> int:
        return self.arrays["train"].shape[-1]

    def markers(self, split: str | None = None) -> list[Path]:
        marks = self.path / "progress"
        found = sorted(m for m in marks.iterdir() if MARKER.fullmatch(m.name)) if marks.is_dir() else []
        return [m for m in found if split is None or m.name.startswith(f"{split}-")]

    def bad_chunks(self, record: Record | None = None, splits=SPLITS) -> list[str]:
        """The chunks whose rows do not match the checksum in their marker (or have none): '<split>-<row>'.
        Read a chunk at a time (not through the memory map: the check reads the whole store). With a `record`, a
        split verified before (same file by a stat, same markers) is not read again, and one found whole is
        recorded."""
        bad = []
        for split in splits:
            arr = self.array(split)
            rows = NpyRows(arr.filename, arr.offset, arr.shape, arr.dtype)
            file = Path(rows.path)
            if record is not None and record.known(file, "chunks") == self.split_stamp(split):
                continue
            stat, before = identity(file), len(bad)
            for start in range(0, len(rows), CHUNK_ROWS):
                marker = self.path / "progress" / f"{split}-{start}"
                recorded = marker.read_text().strip() if marker.is_file() else ""
                try:
                    digest = bytes_digest(rows.raw(start, min(start + CHUNK_ROWS, len(rows))))
                except EOFError:
                    digest = "truncated"
                if recorded != digest:
                    bad.append(marker.name)
            if record is not None and len(bad) == before:
                record.remember(file, self.split_stamp(split), "chunks", stat)
        return bad

    def split_stamp(self, split: str) -> str:
        """A split's content identity: a hash of its chunks' checksums."""
        return bytes_digest("".join(f"{m.name}={m.read_text().strip()};" for m in self.markers(split)).encode())[:16]

    def stamp(self) -> dict[str, str]:
        """The store's content identity per split (runs record it: a split embedded again with other bytes makes
        the runs that read it stale, and says which split)."""
        return {split: self.split_stamp(split) for split in SPLITS}

    def rows(self, table: pd.DataFrame, views: int | None = None) -> np.ndarray:
        """Features (n x V x D, float16 as stored) of the table's patches, in its order: the first `views`
        views, or every view that all the table's splits have (labelled splits also hold the HED views)."""
        return TableRows(self, table, views).tensor().numpy()


def views_of(split: str, cfg: Config) -> int:
    """The views a split's rows hold: the TTA views, and the HED views for labelled splits."""
    return cfg.model.feature_views + (cfg.model.feature_hed_views if LABELLED[split] else 0)
