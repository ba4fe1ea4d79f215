"""Torch datasets over :class:`~training.data.records.Record` lists.

Items are dicts: ``image`` [1, S, S] float32 in the network range (the dataset's
:class:`~cxrviewer.core.preprocess.Preprocess`, as a bundle manifest says), ``labels``
[C] float32 (C: the dataset's ``classes``, default the NIH 14), ``boxes`` [M, 5] float32 rows of (class index, x, y, w, h) in the
S-pixel space, ``index`` (int). :func:`collate` stacks images/labels and keeps
boxes as a list. Augmentation randomness is seeded by (seed, epoch, index), so
a run is reproducible and a resumed run sees the same augmentations.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.preprocess import Preprocess

from .records import Record
from .transforms import (AugmentConfig, AugmentDraw, affine_boxes, augment, draw_augment, geometric,
                         resize_image_and_boxes)

Normalisation = str | Mapping[str, Any]


def load_pixels(path) -> np.ndarray:
    """float32 [H, W] in [0, 1] through cxrviewer's study loader (DICOM, PNG, JPEG, TIFF)."""
    from cxrviewer.core.io import load_study

    return load_study(path).model_input


def boxes_to_array(boxes: list[Box], classes: Sequence[str] = CLASSES) -> np.ndarray:
    """``[M, 5]`` rows (class index in ``classes``, x, y, w, h); boxes of other classes are left out
    (the records are mapped onto the training classes first: :mod:`training.data.labels`)."""
    index = {c: i for i, c in enumerate(classes)}
    rows = [(index[b.label], b.x, b.y, b.w, b.h) for b in boxes if b.label in index]
    return np.asarray(rows, np.float32).reshape(-1, 5)


def dataset_preprocess(ds: Dataset) -> Preprocess:
    """The :class:`Preprocess` whose normalisation a dataset's images carry.

    ``ds.preprocess``, else one built from a ``normalisation`` attribute (kind or
    manifest mapping), else that of the dataset it wraps (``base``/``dataset``),
    else the default ``minus1_1``.
    """
    while True:
        pp = getattr(ds, "preprocess", None)
        if isinstance(pp, Preprocess):
            return pp
        if getattr(ds, "normalisation", None) is not None:
            return Preprocess.from_normalisation(ds.normalisation)
        inner = getattr(ds, "base", None)
        inner = getattr(ds, "dataset", None) if inner is None else inner
        if inner is None:
            return Preprocess()
        ds = inner


class _AugmentedBase(Dataset):
    """Shared augmentation + normalisation; ``preprocess`` wins over a ``normalisation`` kind."""

    def __init__(self, size: int, augment_cfg: AugmentConfig | None, normalisation: Normalisation, seed: int,
                 preprocess: Preprocess | None = None, classes: Sequence[str] = CLASSES) -> None:
        self.size = size
        #: the training classes, in the order of ``labels`` and the box rows' class index
        self.classes = tuple(classes)
        self.augment_cfg = augment_cfg
        self.preprocess = preprocess if preprocess is not None else Preprocess.from_normalisation(normalisation, size)
        self.seed = seed
        self.epoch = 0

    @property
    def normalisation(self) -> str:
        """The normalisation kind of :attr:`preprocess`."""
        return self.preprocess.normalisation

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _finish(self, img: np.ndarray, boxes: list[Box], labels: np.ndarray, index: int,
                epoch: int | None = None) -> dict:
        if self.augment_cfg is not None:
            rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, index))
            img, boxes = augment(img, boxes, rng, self.augment_cfg)
        x = torch.from_numpy(self.preprocess.normalise_array(img))[None]
        return {"image": x, "labels": torch.from_numpy(np.asarray(labels, np.float32)),
                "boxes": torch.from_numpy(boxes_to_array(boxes, self.classes)), "index": index}

    def pixels(self, i: int) -> tuple[np.ndarray, list[Box]]:
        """Item ``i``'s image [S, S] (uint8, or float32 in [0, 1]) and boxes, before augmentation."""
        raise NotImplementedError

    def _labels_of(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def item(self, i: int, epoch: int | None = None) -> dict:
        """``self[i]`` as epoch ``epoch`` augments it (default :attr:`epoch`)."""
        img, boxes = self.pixels(i)
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        return self._finish(img, boxes, self._labels_of(i), i, epoch)

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def raw_item(self, i: int, epoch: int | None = None) -> dict:
        """Item ``i`` for :class:`~training.data.loader.DeviceTransform`: ``image`` [1, S, S] as stored
        (uint8 from a cache, float32 in [0, 1] from files), not augmented nor normalised; ``aug`` [9]
        its augmentation (:meth:`AugmentDraw.vector`, the draw of ``(seed, epoch, index)`` as in
        ``__getitem__``); ``boxes`` already augmented; ``labels``, ``index``. ``epoch``: default
        :attr:`epoch`. The device transform of a batch of these equals a batch of ``__getitem__``."""
        img, boxes = self.pixels(i)
        draw = AugmentDraw()
        if self.augment_cfg is not None:
            rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, i))
            draw = draw_augment(rng, self.augment_cfg)
            if geometric(self.augment_cfg):
                h, w = img.shape
                boxes = affine_boxes(boxes, w, h, draw.rot_deg, draw.scale, *draw.shift)
        return {"image": torch.from_numpy(np.ascontiguousarray(img))[None],
                "aug": torch.from_numpy(draw.vector()),
                "labels": torch.from_numpy(np.asarray(self._labels_of(i), np.float32)),
                "boxes": torch.from_numpy(boxes_to_array(boxes, self.classes)), "index": i}


class ChestDataset(_AugmentedBase):
    """Decodes files on every access (see :class:`~training.data.cache.CachedDataset` for speed)."""

    def __init__(self, records: list[Record], size: int = 256, augment_cfg: AugmentConfig | None = None,
                 normalisation: Normalisation = "minus1_1", seed: int = 0, *,
                 preprocess: Preprocess | None = None, classes: Sequence[str] = CLASSES) -> None:
        super().__init__(size, augment_cfg, normalisation, seed, preprocess, classes)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, len(self.classes)))

    def pixels(self, i: int) -> tuple[np.ndarray, list[Box]]:
        """Record ``i`` decoded and resized: float32 [S, S] in [0, 1] and its boxes."""
        r = self.records[i]
        return resize_image_and_boxes(load_pixels(r.path), r.boxes, self.size)

    def _labels_of(self, i: int) -> np.ndarray:
        return self.records[i].labels


def collate(items: list[dict]) -> dict:
    """Stack images and labels (and ``aug`` of :meth:`~_AugmentedBase.raw_item` items); boxes stay a
    list of [M_i, 5] tensors."""
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if items and "aug" in items[0]:
        out["aug"] = torch.stack([it["aug"] for it in items])
    return out
