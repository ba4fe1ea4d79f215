"""HDF5 cache of preprocessed images: one decode per image, then I/O-cheap epochs.

Layout of a cache file (``cxr-train cache``)::

    images        uint8 [N, S, S]   chunked one image per chunk, gzip level 1 off by default
    labels        float32 [N, C]
    keys          str [N]            NIH "Image Index" stems
    patient_ids   str [N]
    boxes         float32 [M, 6]     (image row, class index, x, y, w, h) in S pixels
    attrs: size, classes (json), source, format_version
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.preprocess import Preprocess

from .dataset import Normalisation, _AugmentedBase, load_pixels
from .records import Record
from .transforms import AugmentConfig, resize_image_and_boxes

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def build_cache(records: list[Record], out: str | Path, size: int = 256, *, progress=None) -> Path:
    """Decode, resize and store ``records`` in an HDF5 file (written atomically)."""
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    n = len(records)
    box_rows: list[tuple] = []
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("images", (n, size, size), dtype="u1", chunks=(1, size, size))
            f.create_dataset("labels", data=np.stack([r.labels for r in records]).astype(np.float32)
                             if n else np.zeros((0, len(CLASSES)), np.float32))
            str_dt = h5py.string_dtype()
            f.create_dataset("keys", data=np.array([r.key for r in records], dtype=object), dtype=str_dt)
            f.create_dataset("patient_ids", data=np.array([r.patient_id for r in records], dtype=object),
                             dtype=str_dt)
            for i, r in enumerate(records):
                img, boxes = resize_image_and_boxes(load_pixels(r.path), r.boxes, size)
                ds[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
                for b in boxes:
                    if b.label in CLASSES:
                        box_rows.append((i, CLASSES.index(b.label), b.x, b.y, b.w, b.h))
                if progress is not None:
                    progress(i + 1, n)
            f.create_dataset("boxes", data=np.asarray(box_rows, np.float32).reshape(-1, 6))
            f.attrs["size"] = size
            f.attrs["classes"] = json.dumps(list(CLASSES))
            f.attrs["format_version"] = FORMAT_VERSION
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("cache %s: %d images at %d px, %d boxes", out, n, size, len(box_rows))
    return out


class CachedDataset(_AugmentedBase):
    """Dataset over a cache file; ``rows`` selects a subset (e.g. a fold)."""

    def __init__(self, path: str | Path, rows: np.ndarray | list[int] | None = None,
                 augment_cfg: AugmentConfig | None = None, normalisation: Normalisation = "minus1_1",
                 seed: int = 0, *, preprocess: Preprocess | None = None) -> None:
        import h5py

        self.path = str(path)
        with h5py.File(self.path, "r") as f:
            size = int(f.attrs["size"])
            self._labels = f["labels"][()]
            self.keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            self.patient_ids = [k.decode() if isinstance(k, bytes) else str(k) for k in f["patient_ids"][()]]
            boxes = f["boxes"][()]
        super().__init__(size, augment_cfg, normalisation, seed, preprocess)
        self.rows = np.arange(len(self._labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._boxes: dict[int, list[Box]] = {}
        for row in boxes:
            self._boxes.setdefault(int(row[0]), []).append(
                Box(CLASSES[int(row[1])], float(row[2]), float(row[3]), float(row[4]), float(row[5])))
        self._file = None  # opened lazily per process (h5py handles are not fork-safe)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.rows]

    def boxes_of(self, i: int) -> list[Box]:
        return list(self._boxes.get(int(self.rows[i]), []))

    def image_u8(self, i: int) -> np.ndarray:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file["images"][int(self.rows[i])]

    def __getitem__(self, i: int) -> dict:
        img = self.image_u8(i).astype(np.float32) / 255.0
        return self._finish(img, self.boxes_of(i), self._labels[self.rows[i]], i)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_file"] = None
        return d
