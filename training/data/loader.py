"""The training data path: items addressed by (epoch, index), served by persistent workers.

A :class:`~training.data.dataset._AugmentedBase` data set (``ChestDataset``, ``CachedDataset``;
the HDF5 cache of ``cxr-train cache`` serves decoded uint8 pixels, no PNG decoding) gives each
item as a function of ``(seed, epoch, index)`` alone (:class:`EpochItems`, :class:`EpochSampler`),
so one loader with persistent workers serves every epoch and a batch never depends on which
worker made it: runs with 0, 1 or N workers see the same batches. Where the work happens:

- training on CUDA: workers send the stored pixels (uint8 from a cache) with each item's
  augmentation as 9 numbers (:meth:`raw_item`) through pinned memory (``non_blocking`` copies);
  :class:`DeviceTransform` warps the whole batch on the GPU with one ``grid_sample``, applies the
  intensity jitter and the normalisation there;
- training on the CPU: the workers augment and normalise each item (:meth:`item`, the numbers
  the loop always fed), on the cores the main process's network does not use.

Workers are picklable data set copies (``spawn`` on Windows/macOS works); an HDF5 file is
opened once per process.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from cxrviewer.core.preprocess import Preprocess

from .dataset import dataset_preprocess
from .transforms import AugmentConfig, augment_batch

#: most workers the automatic ``--workers`` picks
MAX_AUTO_WORKERS = 4


def default_workers() -> int:
    """The ``--workers`` default: half the CPU cores (shared among ``torchrun``'s local processes),
    at most :data:`MAX_AUTO_WORKERS` where workers fork (Linux), at most 2 where they spawn (Windows,
    macOS: each one re-imports torch, once per run: the loader keeps them for all epochs); 0 on a
    single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    cap = MAX_AUTO_WORKERS if sys.platform.startswith("linux") else 2
    return max(0, min(cap, cores // 2 // local))


def resolve_workers(workers: int | None) -> int:
    """``--workers``: None -> :func:`default_workers`; a negative count is refused."""
    if workers is None:
        return default_workers()
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    return int(workers)


class DeviceTransform:
    """Augment (:func:`~training.data.transforms.augment_batch`) and normalise a batch of
    :meth:`raw_item` items where it lies (the GPU when training on one): ``image`` becomes float32
    [B, C, S, S] in the network range, the batch's ``aug`` is dropped."""

    def __init__(self, preprocess: Preprocess, augment_cfg: AugmentConfig | None) -> None:
        self.preprocess = preprocess
        self.augment_cfg = augment_cfg

    @classmethod
    def of(cls, ds: Dataset) -> "DeviceTransform | None":
        """The transform of a data set serving :meth:`raw_item` and :meth:`item` (None for any other)."""
        if not callable(getattr(ds, "raw_item", None)) or not callable(getattr(ds, "item", None)):
            return None
        return cls(dataset_preprocess(ds), getattr(ds, "augment_cfg", None))

    def __call__(self, batch: dict) -> dict:
        x = batch["image"]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.augment_cfg is not None and "aug" in batch:
            x = augment_batch(x, batch["aug"], self.augment_cfg)
        out = {k: v for k, v in batch.items() if k != "aug"}
        out["image"] = self.preprocess.normalise(x)
        return out


class EpochItems(Dataset):
    """``ds``'s items addressed by ``(epoch, index)`` keys (:class:`EpochSampler`): ``raw`` ->
    :meth:`raw_item` (for a :class:`DeviceTransform`), else :meth:`item` (augmented, normalised)."""

    def __init__(self, ds: Dataset, raw: bool = True) -> None:
        self.ds, self.raw = ds, bool(raw)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        if self.raw:
            return self.ds.raw_item(int(i), int(epoch))
        return self.ds.item(int(i), int(epoch))


class EpochSampler(Sampler):
    """``(epoch, index)`` keys of one epoch, shuffled as the loop always shuffled: a
    ``RandomSampler`` with a generator seeded ``seed * 1000 + epoch`` (the loader's own draw first),
    or ``DistributedSampler``'s share of this rank under ``torchrun``. :meth:`set_epoch` before
    each pass; the sampler runs in the main process, so persistent workers follow it."""

    def __init__(self, n: int, seed: int, *, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = int(n), int(seed), int(rank), int(world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This epoch's item order (this rank's share under ``torchrun``)."""
        if self.world > 1:
            dist = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                      seed=self.seed)
            dist.set_epoch(self.epoch)
            return list(dist)
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=gen)  # the DataLoader's base-seed draw
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        if self.world > 1:
            return -(-self.n // self.world)
        return self.n
