"""Batches from the prepared uint8 cache.

Images live in memory as one N x S x S x 3 uint8 array. Without a per-item transform a batch is
gathered with one fancy-index (`__getitems__`), so there is no per-item Python work; with the
albumentations backend each item is transformed in the DataLoader workers. Loaders are plain
torch DataLoaders, so `accelerator.prepare` shards them across processes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class PatchDataset(Dataset):
    def __init__(self, images: np.ndarray, table: pd.DataFrame, domain_of_center: dict[int, int],
                 transform=None):
        if len(images) != len(table):
            raise ValueError(f"{len(images)} images for {len(table)} table rows")
        self.images = images
        self.ids = table["id"].to_numpy(np.int64)
        self.centers = table["center"].to_numpy(np.int64)
        self.labels = table["label"].to_numpy(np.float32)
        self.domains = np.array([domain_of_center[c] for c in self.centers], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def _meta(self, idx) -> dict:
        return {"id": torch.as_tensor(self.ids[idx]), "center": torch.as_tensor(self.centers[idx]),
                "label": torch.as_tensor(self.labels[idx]), "domain": torch.as_tensor(self.domains[idx])}

    def __getitem__(self, i: int) -> dict:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return {"image": torch.from_numpy(np.ascontiguousarray(img)), **self._meta(i)}

    def __getitems__(self, idx: list[int]):
        if self.transform is not None:
            return [self[i] for i in idx]
        idx = np.asarray(idx)
        return {"image": torch.from_numpy(self.images[idx]), **self._meta(idx)}


def collate(batch):
    return batch if isinstance(batch, dict) else default_collate(batch)


EPOCH_STRIDE = 100_003  # seed offset between epochs: the data order of epoch e is a function of (seed, e)


def make_loader(dataset: PatchDataset, batch_size: int, train: bool, num_workers: int = 0,
                seed: int = 0, persistent: bool = True) -> DataLoader:
    workers = num_workers if dataset.transform is not None else 0  # a batch gather needs no workers
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
        collate_fn=collate, pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def cycle(loader):
    """Endless iteration over a loader (reshuffled each pass), for the unlabelled target batches."""
    while True:
        yield from loader


def place_images(images: np.ndarray, device: torch.device, placement: str = "auto") -> torch.Tensor:
    """The uint8 image array as a tensor on the device (when it fits, or when asked) or in host memory
    (pinned when a GPU will read it)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        fits = tensor.nbytes < torch.cuda.mem_get_info(device)[0] / 3
        if placement == "device" or (placement == "auto" and fits):
            return tensor.to(device)
        return tensor.pin_memory()
    return tensor


class TensorBatches:
    """Shuffled training batches gathered from one image tensor: one index operation per batch and
    no per-item Python work. Every process draws the same permutation from `seed` and takes its own
    slice of each step, so `accelerate launch` shards the data without a sampler. The permutation
    changes every pass; `set_epoch` makes the order a function of (seed, epoch), so a run resumed
    at an epoch sees the batches an uninterrupted one would. `one_view`: each row's batch item is one of its
    views (images N x V x ...), drawn at random with the order."""

    def __init__(self, images: torch.Tensor, table: pd.DataFrame, domain_of_center: dict[int, int],
                 batch_size: int, device: torch.device, seed: int = 0, rank: int = 0, world: int = 1,
                 one_view: bool = False):
        self.images, self.device, self.one_view = images, device, one_view
        self.labels = torch.as_tensor(table["label"].to_numpy(np.float32))
        self.domains = torch.as_tensor(np.array([domain_of_center[c] for c in table["center"]], dtype=np.int64))
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + EPOCH_STRIDE * epoch)

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world)

    def __iter__(self):
        perm = torch.randperm(len(self.labels), generator=self.generator)
        batches = [perm[(b * self.world + self.rank) * self.batch_size:][:self.batch_size] for b in range(len(self))]
        if self.one_view:  # N x V x ... images: one random view of each row, drawn with the order (resumable)
            views = torch.randint(0, self.images.shape[1], (len(self), self.batch_size), generator=self.generator)
            keys = [(idx, v[:len(idx)]) for idx, v in zip(batches, views)]
            gather = lambda key: self.images[key[0].to(self.images.device), key[1].to(self.images.device)]  # noqa: E731
        else:
            keys = batches
            gather = lambda idx: self.images[idx.to(self.images.device)]  # noqa: E731
        if isinstance(self.images, torch.Tensor) or self.device.type != "cuda":
            # on a CPU the step's threads take every core: a reading thread would only compete with them
            pending = iter(map(gather, keys))
        else:  # rows read from disk (a feature store) for a GPU: the next batch is read on a thread while the GPU
            # trains on this one; by hand, since a DataLoader's workers would be processes re-opening the store
            pending = read_ahead(gather, keys)
        for idx, images in zip(batches, pending):
            yield {"image": images.to(self.device, non_blocking=True),
                   "label": self.labels[idx].to(self.device, non_blocking=True),
                   "domain": self.domains[idx].to(self.device, non_blocking=True)}


def read_ahead(read, items):
    """read(item) for each item in order, the next one read on a thread while the caller works on this one."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, items[0]) if items else None
        for k in range(len(items)):
            done = pending.result()
            pending = pool.submit(read, items[k + 1]) if k + 1 < len(items) else None
            yield done
