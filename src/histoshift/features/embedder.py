"""Stage `embed`'s work: the frozen backbone embeds every patch once (all 8 dihedral views, and optionally K
HED-jittered views of each labelled patch) into the feature store (store.py), so that heads (linear, MLP, with or
without the DANN domain head) then train in seconds.

Embedding is the long step (a ViT-g over the competition runs for about an hour on one GPU), so it
runs in fixed chunks of rows written straight into the memory-mapped arrays; a chunk's marker file is
written after its rows are flushed (with its checksum), and a killed run resumes at the first chunk without
a marker; a chunk whose rows no longer match is embedded again, never trained on. For hub weights, meta.json
also records the snapshot's files as they were (`snapshot_files`: blob names, sizes, config text hashes):
a file replaced in the cache under the same revision makes the store embed again. Within a chunk, all views of a
batch go through the backbone in one forward under the recipe's autocast precision, after the config's input
transform (stain normalisation, grayscale); on a GPU the batch is fitted to free memory and halved on
out-of-memory. With `accelerate launch` each process embeds its own share of the chunks.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, find_executable_batch_size
from accelerate.utils.memory import should_reduce_batch_size
from torch import nn

from ..config import Config
from ..data.augment import apply_dihedral, to_float
from ..data.cache import SPLITS, Cache
from ..data.loader import read_ahead
from ..precision import autocast
from ..progress import bar as progress_bar
from ..stain.hed import hed_transform
from ..tta import per_view, view_stack
from . import store as layout  # layout.CHUNK_ROWS read at call time: one fact, in store.py
from ..verified import VERIFIED, Record
from .lock import StoreLock
from .repair import diagnose
from .store import (FeatureError, FeatureStore, begin_store, finish_store, open_split, reserve_split, store_key,
                    views_of, write_chunk)

CPU_IMAGES = 64  # images per forward on CPU (small batches stay in cache)
MAX_IMAGES = 2048  # images per forward on a GPU (throughput saturates well before)
HED_SEED = 20261124


def draw_jitter(n: int, k: int, sigma: float, seed: int) -> tuple[torch.Tensor, ...]:
    """For K HED views of n images: dihedral view (k, n), HED scale U(1-s, 1+s) and shift U(-s, s) per
    H/E/D channel (k, n, 3). Drawn per chunk from `seed`, so a resumed chunk gets the same views
    whatever the batch size."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, 8, (k, n), generator=g)
    alpha = 1 + (torch.rand(k, n, 3, generator=g) * 2 - 1) * sigma
    beta = (torch.rand(k, n, 3, generator=g) * 2 - 1) * sigma
    return ks, alpha, beta


def hed_views(x: torch.Tensor, ks: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The K jittered views of a float batch, one view after another (K*B images)."""
    return torch.cat([hed_transform(apply_dihedral(x, ks[j]), alpha[j].to(x), beta[j].to(x)) for j in range(len(ks))])


class Embedder:
    """Runs the backbone over uint8 batches: the views stacked into one forward, autocast, and a batch
    size fitted to free GPU memory (halved on out-of-memory)."""

    def __init__(self, backbone: nn.Module, preprocess, cfg: Config, transform, device: torch.device, precision: str,
                 make_views=None):
        self.backbone, self.preprocess, self.cfg, self.transform = backbone, preprocess, cfg, transform
        self.device, self.precision = device, precision
        self.make_views = make_views  # (x, centers) -> V x B images instead of the dihedral and HED views
        self._probe_centers = None  # the first two centers of the chunk at hand (the GPU batch-size probe)
        self.batch = cfg.model.embed_batch_size or None  # patches per forward; None: fitted on first use
        self.proven = False  # whether a call ran at self.batch

    def _forward(self, images: np.ndarray, n_views: int, jitter=None, centers=None) -> torch.Tensor:
        x = self.transform.infer(to_float(torch.from_numpy(images).to(self.device, non_blocking=True)))
        if self.make_views is not None:
            stacked = self.preprocess(self.make_views(x, centers).flatten(0, 1))
        else:
            stacked = view_stack(x, range(self.cfg.model.feature_views), self.preprocess)
        if jitter is not None:
            stacked = torch.cat([stacked, self.preprocess(hed_views(x, *jitter))])
        with autocast(self.device, self.precision):
            f = self.backbone(stacked)
        return per_view(f.float(), n_views)

    def _fit(self, images: np.ndarray, n_views: int) -> int:
        """Patches per forward: on CPU a small fixed batch; on a GPU, what 85% of the free memory holds,
        from the peak memory of a 2-patch probe."""
        if self.device.type != "cuda":
            return max(1, CPU_IMAGES // n_views)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._forward(images[:2], n_views, self._jitter(2, n_views, 0), None if self.make_views is None else
                      self._probe_centers)
        torch.cuda.synchronize(self.device)
        per_patch = max(1, (torch.cuda.max_memory_allocated(self.device) - base) / 2)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(0.85 * free / per_patch, MAX_IMAGES // n_views)))

    def _jitter(self, n: int, n_views: int, seed: int):
        if self.make_views is not None:
            return None
        k = n_views - self.cfg.model.feature_views
        return draw_jitter(n, k, self.cfg.model.feature_hed_sigma, seed) if k > 0 else None

    @torch.no_grad()
    def __call__(self, images: np.ndarray, n_views: int, seed: int, centers: torch.Tensor | None = None) -> np.ndarray:
        """(n, V, D) float16 features of n uint8 images (`centers`: theirs, for `make_views`). On out-of-memory
        Accelerate's `find_executable_batch_size` retries the chunk with the batch halved (the fitted size is
        kept for the chunks after)."""
        self._probe_centers = None if centers is None else centers[:2]
        if self.batch is None:
            self.batch = self._fit(images, n_views)
        jitter = self._jitter(len(images), n_views, seed)

        def halve() -> int:
            self.batch //= 2  # 0: Accelerate gives up ("no executable batch size")
            print(f"embed: out of GPU memory, batch halved to {self.batch} patches x {n_views} views")
            return self.batch

        def run(batch: int) -> np.ndarray:
            out = [self._forward(images[i:i + batch], n_views,
                                 None if jitter is None else tuple(j[:, i:i + batch] for j in jitter),
                                 None if centers is None else centers[i:i + batch]).half().cpu()
                   for i in range(0, len(images), batch)]
            return torch.cat(out).numpy()

        if self.proven:  # the batch ran before: no search (Accelerate's collects garbage on every call, 0.3 s)
            try:
                return run(self.batch)
            except Exception as e:
                if not should_reduce_batch_size(e):
                    raise
                halve()
        out = find_executable_batch_size(run, starting_batch_size=self.batch, reduce_batch_size_fn=halve)()
        self.proven = True
        return out


def _embed_split(path: Path, split: str, images: np.ndarray, embedder: Embedder, n_views: int, dim: int,
                 accelerator: Accelerator, centers: np.ndarray | None = None) -> int:
    """Fill features_<split>.npy chunk by chunk (`centers`: each row's, for an embedder that makes its views by
    center); returns the images embedded by this process."""
    marks, n = path / "progress", len(images)
    if accelerator.is_main_process:
        reserve_split(path, split, (n, n_views, dim))
    accelerator.wait_for_everyone()
    arr = open_split(path, split, (n, n_views, dim))
    starts = [s for s in range(0, n, layout.CHUNK_ROWS) if not (marks / f"{split}-{s}").exists()]
    mine = starts[accelerator.process_index::accelerator.num_processes]
    done_before = n - sum(min(layout.CHUNK_ROWS, n - s) for s in starts)
    if starts and done_before:
        accelerator.print(f"embed: {path.name}: resuming {split} at row {starts[0]} ({done_before} of {n} rows stored "
                          f"before, {len(starts)} chunk(s) to embed)")
    bar = progress_bar(total=n * n_views, initial=done_before * n_views, unit="img", unit_scale=True, smoothing=0.1,
               desc=f"embed {split} ({n_views} views)", main=accelerator.is_local_main_process)
    embedded = 0
    load = lambda s: np.array(images[s:s + layout.CHUNK_ROWS])  # noqa: E731 - a writable copy
    for start, chunk in zip(mine, read_ahead(load, mine)):  # the next chunk read from the cache while the GPU works
        out = embedder(chunk, n_views, HED_SEED + 10**8 * SPLITS.index(split) + start,
                       None if centers is None else torch.as_tensor(centers[start:start + layout.CHUNK_ROWS]))
        if not np.isfinite(out).all():
            row = start + int(np.argwhere(~np.isfinite(out).reshape(len(out), -1).all(1))[0, 0])
            raise FeatureError(f"{path}: the backbone gave non-finite features for {split} row {row} (id in the "
                               "cache's index); nothing of this chunk was stored. Use model.recipe_overrides "
                               "precision fp32 or bf16 (float16 overflows in some models), then embed again")
        write_chunk(path, split, arr, start, out)
        embedded += len(chunk) * n_views
        bar.update(len(chunk) * accelerator.num_processes * n_views)
    bar.close()
    return embedded


@torch.no_grad()
def embed(cfg: Config, cache: Cache, root: Path, accelerator: Accelerator, precision: str, transform,
          spec: dict, robust: Path | None = None, fourier=None) -> FeatureStore:
    """The feature store of this config's backbone (`spec`: its `feature_spec`; `transform`: the config's
    InputTransform, applied before the views; `robust`: the tuned backbone's folder, with model.robustify):
    reused when complete, resumed when partial, and a damaged part (a split's file, chunks, meta.json) embedded
    again alone. `fourier` (a data.donors.FourierTTA and a beta; `spec` then carries their settings): instead of
    the TTA views, every patch's Fourier transfers to its donors.

    Returns with this process holding the store's shared lock (StoreLock, until it exits): a rebuild elsewhere is
    refused while it reads, and it is refused while one runs, so nothing is ever trained on a mixture. The
    clean-up and the embedding run under the exclusive lock; what a full check found whole is recorded
    (verified.py), so the next stage or fold only stats the files."""
    path = Path(root) / store_key(spec)
    lock, record = StoreLock.of(path), Record(Path(root).parent / VERIFIED)
    repair = None
    if (path / "meta.json").exists():
        lock.shared()
        repair = [diagnose(FeatureStore(path), cfg, record) if accelerator.is_main_process else None]
        repair = broadcast_object_list(repair)[0]
        if repair is None:
            return FeatureStore(path)
        lock.release()  # every process: the main one takes the exclusive lock to repair
        accelerator.wait_for_everyone()
    created = not path.exists()
    try:
        if accelerator.is_main_process:
            lock.exclusive()  # one process embeds a store at a time (two head configs on one backbone share it)
            if repair is not None:
                repair.apply(path, accelerator.print)
        accelerator.wait_for_everyone()
        _embed_store(cfg, cache, path, accelerator, precision, transform, spec, robust, fourier)
    except BaseException:  # a failed first attempt (weights unreadable, a bad recipe) leaves no folder behind
        if created and accelerator.is_main_process and lock.mode == "exclusive" and \
                not any((path / "progress").glob("*")):
            lock.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if accelerator.is_main_process and lock.fd is not None:
            lock.release()
    accelerator.wait_for_everyone()
    lock.shared()
    return FeatureStore(path)


def _embed_store(cfg: Config, cache: Cache, path: Path, accelerator: Accelerator, precision: str, transform,
                 spec: dict, robust: Path | None = None, fourier=None) -> None:
    if (path / "meta.json").exists():  # completed by another process between the first check and the lock
        return
    from ..models.backbone import PatchClassifier  # here: a head's processes (train, infer) never import timm

    with torch.random.fork_rng(devices=[]):  # weights none (random features): the same store every time
        torch.manual_seed(0)
        model = PatchClassifier(cfg.model)
    if robust is not None:  # the backbone as the robustify stage tuned it
        from ..models.robust import apply_robust

        model.backbone = apply_robust(model.backbone, cfg.model, robust)
    backbone = model.backbone.eval().to(accelerator.device)
    make_views, centers = None, {}
    if fourier is not None:  # each patch through its donors of other training centers (Fourier transfer)
        tta, beta = fourier
        donors = tta.donors_for(cache, accelerator.device, transform.infer)
        make_views = lambda x, c: donors.views(x, c, beta, tta.donors)  # noqa: E731
        centers = {s: cache.index[cache.index["split"] == s].sort_values("row")["center"].to_numpy() for s in SPLITS}
    embedder = Embedder(backbone, model.preprocess, cfg, transform, accelerator.device, precision, make_views)
    if accelerator.is_main_process:
        begin_store(path, spec)
    accelerator.wait_for_everyone()
    accelerator.print(f"embed: {path.name}, precision {precision}, {model.num_features} values per view")
    t0, count = time.time(), 0
    for split in SPLITS:
        count += _embed_split(path, split, cache.images(split, in_memory=False), embedder,
                              views_of(split, cfg) if fourier is None else fourier[0].donors, model.num_features,
                              accelerator, centers.get(split))
    seconds = time.time() - t0
    if accelerator.num_processes > 1:  # each process its share of the chunks (tests check that every one worked)
        print(f"embed: process {accelerator.process_index + 1} of {accelerator.num_processes} embedded {count} images",
              flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {
            "spec": spec,
            "dim": model.num_features,
            "batch_patches": embedder.batch,
            "seconds": round(seconds, 1),
            "images_per_s": round(count * accelerator.num_processes / max(seconds, 1e-9), 1),
        }
        if spec["backbone"].get("weights", {}).get("hub"):  # the snapshot's files as the weights were loaded
            from ..models.foundation import resolve_recipe
            from ..models.foundation.hub import snapshot_files

            recipe = resolve_recipe(cfg.model.recipe, cfg.model.recipe_overrides)
            meta["weights_files"] = snapshot_files(recipe, Record(path.parent.parent / VERIFIED))
        finish_store(path, meta)
        accelerator.print(
            f"embed: done in {seconds:.0f} s ({meta['images_per_s']} images/s, batch {embedder.batch} patches)"
        )
    accelerator.wait_for_everyone()
