"""The conversion behind the `prepare` stage (stages/prepare.py): HDF5 groups read and validated by several
processes (`workers`), a chunk of ids each, in order, written into reserved uint8 arrays with their quality flags,
then the index, the data overview and the manifest (data/cache.py reads what this writes)."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from ..progress import bar as progress_bar
from ..safeio import reserve_npy, write_csv, write_json
from .cache import CACHE_VERSION, LABELLED, SPLITS, Contract, input_files, quality_report
from .h5_reader import InputError, open_h5, read_chunk, read_record
from .overview import write_overview
from .quality import QualityRule, measure

CHUNK = 1024  # images per read job, write and quality pass (bounds the float temporaries to ~110 MB)


def fingerprint(input_dir: Path, rule: QualityRule, contract: Contract) -> dict:
    """What decides whether the cache must be rebuilt (the manifest holds this and the digests)."""
    fp = {"version": CACHE_VERSION, "files": input_files(input_dir), "rule": asdict(rule), "contract": asdict(contract)}
    return json.loads(json.dumps(fp))  # as the manifest will hold it (tuples become lists)


def _chunk_job(path: Path, keys: list[str], labelled: bool, rule: QualityRule):
    chunk = read_chunk(path, keys, labelled)
    return chunk, measure(chunk.images, rule)


def _chunks(path: Path, keys: list[str], labelled: bool, rule: QualityRule, workers: int):
    """(Chunk, quality) in id order; read by `workers` processes (a bounded window of jobs ahead)."""
    jobs = [keys[i:i + CHUNK] for i in range(0, len(keys), CHUNK)]
    if workers <= 1:
        for job in jobs:
            yield _chunk_job(path, job, labelled, rule)
        return
    # spawned, not forked: the parent may hold threads (torch, tqdm) and HDF5 state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending = [pool.submit(_chunk_job, path, job, labelled, rule) for job in jobs[:2 * workers]]
        for k in range(len(jobs)):
            result = pending.pop(0).result()
            if k + 2 * workers < len(jobs):
                pending.append(pool.submit(_chunk_job, path, jobs[k + 2 * workers], labelled, rule))
            yield result


def _convert_split(path: Path, keys: list[str], split: str, out: Path, rule: QualityRule, contract: Contract,
                   side: int, workers: int) -> tuple[pd.DataFrame, str]:
    images = reserve_npy(
        out, (len(keys), side, side, 3), np.uint8, f"the {split} images (the previous cache is untouched)"
    )
    allowed = set(contract.of(split))
    digest = hashlib.blake2b(digest_size=16)
    frames, row = [], 0
    bar = progress_bar(total=len(keys), desc=f"prepare {split}", unit="img")
    for chunk, q in _chunks(path, keys, LABELLED[split], rule, workers):
        if chunk.images.shape[1] != side:
            raise InputError(
                f"{path}, id {chunk.ids[0]}: img side {chunk.images.shape[1]} differs from the {side} seen before"
            )
        inside = np.isin(chunk.centers, list(allowed)) if allowed else None
        if inside is not None and not inside.all():
            k = int(np.argmin(inside))
            raise InputError(f"{path}, id {chunk.ids[k]}: center {chunk.centers[k]} is not a {split} center of the "
                             f"contract ({contract}); files that follow another split: prepare --centers "
                             "'train=..;val=..;test=..' (or 'any')")
        images[row:row + len(chunk.ids)] = chunk.images
        for part in (chunk.ids, chunk.labels, chunk.centers, chunk.images):
            digest.update(np.ascontiguousarray(part).tobytes())
        frames.append(pd.DataFrame({"id": chunk.ids, "split": split, "row": np.arange(row, row + len(chunk.ids)),
                                    "center": chunk.centers, "label": chunk.labels, **q}))
        row += len(chunk.ids)
        bar.update(len(chunk.ids))
    bar.close()
    images.flush()
    del images
    return pd.concat(frames, ignore_index=True), digest.hexdigest()


def first_side(path: Path, first_key: str) -> int:
    with open_h5(path) as f:
        return read_record(path, f, first_key, labelled=False).img.shape[0]


def default_workers(n_images: int) -> int:
    return 1 if n_images < 8 * CHUNK else max(1, min(os.cpu_count() or 1, 8))


def build(paths: dict, keys: dict, out: Path, rule: QualityRule, contract: Contract, side: int, workers: int,
           fp: dict, content: dict) -> pd.DataFrame:
    frames, digests, seen = [], {}, {}
    for split, path in paths.items():
        df, digests[split] = _convert_split(path, keys[split], split, out / f"images_{split}.npy", rule, contract,
                                            side, workers)
        for i in df["id"]:
            if i in seen:
                raise InputError(f"{path}, id {i}: duplicate id, already present in {seen[i]}")
            seen[i] = path
        frames.append(df)
    index = pd.concat(frames, ignore_index=True)
    write_csv(out / "index.csv", index)
    write_csv(out / "quality_report.csv", quality_report(index))
    write_overview(out, index)  # overview.png, colours.png, colour_stats.csv
    splits = {s: {"patches": int((index["split"] == s).sum()), "digest": digests[s]} for s in SPLITS}
    cache_id = hashlib.blake2b(json.dumps([splits, fp["rule"]], sort_keys=True).encode(), digest_size=8).hexdigest()
    write_json(out / "manifest.json", {**fp, "content": content, "splits": splits, "cache_id": cache_id})
    return index
