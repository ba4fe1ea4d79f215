"""HDF5 cache of preprocessed images: one decode per image, then I/O-cheap epochs.

Layout of a cache file (``cxr-train cache``)::

    images        uint8 [N, S, S]   chunked one image per chunk, gzip level 1 off by default
    labels        float32 [N, C]
    keys          str [N]            NIH "Image Index" stems
    patient_ids   str [N]
    boxes         float32 [M, 6]     (image row, class index, x, y, w, h) in S pixels
    attrs: size, classes (json), source, format_version, aligned

An aligned cache (``build_cache(..., align=BUNDLE)``, ``--align``) stores the images as the app
feeds them to the classifier/DM/CIA networks (the whole registered chest) and adds::

    align_theta    float32 [N, 2, 3]  the affine applied (identity where the check rejected it)
    align_quality  float32 [N]        NCC to the canonical chest (the app's check)
    align_rejected bool [N]           stored unaligned, as the app runs a rejected image
    attrs: alignment (json: bundle, weights SHA-256, canonical chest, frame size)
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.preprocess import Preprocess

from .dataset import Normalisation, _AugmentedBase, load_pixels
from .records import Record
from .transforms import AugmentConfig, resize_image_and_boxes
from cxrviewer.core.atomic import mkstemp_beside

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _stored_alignment(path: str | Path) -> dict[str, tuple[np.ndarray, bool, float]]:
    """Per key: (theta [2, 3], rejected, quality) of an aligned cache (reused for another size)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "align_theta" not in f:
            raise ValueError(f"{path} is not an aligned cache (no align_theta)")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
        th, rej, q = f["align_theta"][()], f["align_rejected"][()], f["align_quality"][()]
    return {k: (th[i], bool(rej[i]), float(q[i])) for i, k in enumerate(keys)}


def _align_source(align: Any) -> tuple[Any, dict | None, dict]:
    """(alignment bundle, stored alignments or None, cache attrs) for ``build_cache(align=...)``."""
    from cxrviewer.core.checksum import sha256_file

    from .aligned import FRAME_MAX_SIDE, load_alignment_bundle

    if isinstance(align, (str, Path)) and str(align).endswith(".h5"):
        import h5py

        with h5py.File(align, "r") as f:
            attrs = json.loads(f.attrs["alignment"])
        return None, _stored_alignment(align), {**attrs, "reused_from": str(align)}
    bundle = load_alignment_bundle(align)
    wfile = bundle.path / "weights.pt"
    frame = _frame_record(bundle)
    return bundle, None, {"bundle": bundle.path.name, "path": str(bundle.path),
                          "weights_sha256": sha256_file(wfile) if wfile.is_file() else None,
                          "canonical_chest": (bundle.manifest.canonical_chest or {}).get("file"),
                          "frame_max_side": FRAME_MAX_SIDE, "frame": "whole registered chest (full_frame_theta)",
                          **frame, "rejected": "stored unaligned, as the app runs"}


def _frame_record(bundle: Any) -> dict:
    """The canonical crop box and models' frame an alignment bundle's canonical chest records."""
    from cxrviewer.core.canonical import canonical_crop_box, model_frame_box
    from cxrviewer.core.explain.alignment import canonical_path

    try:
        path = canonical_path(bundle)
    except FileNotFoundError:
        path = None
    if path is None:
        return {"crop_box": None, "model_frame": None}
    return {"crop_box": canonical_crop_box(path), "model_frame": list(model_frame_box(path))}


def _cache_image(r: Record, size: int, bundle: Any, stored: dict | None):
    """(image [S, S] in [0, 1], boxes, (theta, rejected, quality) or None) of one record."""
    from .aligned import align_image

    if bundle is None and stored is None:
        img, boxes = resize_image_and_boxes(load_pixels(r.path), r.boxes, size)
        return img, boxes, None
    kw = {}
    if stored is not None:
        th, rej, q = stored[r.key]
        kw = {"theta": th, "rejected": rej, "quality": q}
    a = align_image(load_pixels(r.path), r.boxes, size, bundle, **kw)
    return a.image, a.boxes, (a.theta, a.rejected, a.quality)


def build_cache(records: list[Record], out: str | Path, size: int = 256, *, progress=None,
                align: Any = None, classes: Sequence[str] = CLASSES) -> Path:
    """Decode, resize and store ``records`` in an HDF5 file (written atomically).

    ``align``: an alignment bundle (path or ``LoadedBundle``) -> every image is stored as the app
    feeds it to the classifier/DM/CIA networks (:mod:`training.data.aligned`: the app's
    ``align_for_models``, whole registered chest, rejected alignments stored unaligned), with
    ``align_theta``/``align_quality``/``align_rejected`` per image and ``attrs["alignment"]``; or
    an aligned cache ``.h5`` whose stored affines are reused (another size, no re-alignment).
    ``classes``: the order of the records' labels (``attrs["classes"]``; boxes of other classes are
    counted and reported in one warning line).
    """
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle, stored, align_attrs = _align_source(align) if align is not None else (None, None, {})
    fd, tmp = mkstemp_beside(out)
    os.close(fd)
    n = len(records)
    box_rows: list[tuple] = []
    al: list[tuple] = []
    index = {c: i for i, c in enumerate(classes)}
    left_out: Counter = Counter()
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("images", (n, size, size), dtype="u1", chunks=(1, size, size))
            f.create_dataset("labels", data=np.stack([r.labels for r in records]).astype(np.float32)
                             if n else np.zeros((0, len(classes)), np.float32))
            str_dt = h5py.string_dtype()
            f.create_dataset("keys", data=np.array([r.key for r in records], dtype=object), dtype=str_dt)
            f.create_dataset("patient_ids", data=np.array([r.patient_id for r in records], dtype=object),
                             dtype=str_dt)
            for i, r in enumerate(records):
                img, boxes, a = _cache_image(r, size, bundle, stored)
                ds[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
                if a is not None:
                    al.append(a)
                for b in boxes:
                    if b.label in index:
                        box_rows.append((i, index[b.label], b.x, b.y, b.w, b.h))
                    else:
                        left_out[b.label] += 1
                if progress is not None:
                    progress(i + 1, n)
            f.create_dataset("boxes", data=np.asarray(box_rows, np.float32).reshape(-1, 6))
            if align is not None:
                f.create_dataset("align_theta", data=np.asarray([a[0] for a in al], np.float32).reshape(-1, 2, 3))
                f.create_dataset("align_rejected", data=np.asarray([a[1] for a in al], bool))
                f.create_dataset("align_quality", data=np.asarray([a[2] for a in al], np.float32))
                f.attrs["alignment"] = json.dumps(align_attrs)
            f.attrs["aligned"] = align is not None
            f.attrs["size"] = size
            f.attrs["classes"] = json.dumps(list(classes))
            f.attrs["format_version"] = FORMAT_VERSION
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if left_out:
        log.warning("cache %s: left out %d boxes (%s): their classes are not in the cache's %d classes", out,
                    sum(left_out.values()), ", ".join(f"{k!r} x{v}" for k, v in sorted(left_out.items())),
                    len(classes))
    log.info("cache %s: %d images at %d px, %d boxes%s", out, n, size, len(box_rows),
             f", aligned ({sum(a[1] for a in al)} rejected, stored unaligned)" if al else "")
    return out


def cache_alignment(path: str | Path) -> dict | None:
    """``attrs["alignment"]`` of an aligned cache (None: an unaligned cache)."""
    import h5py

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["alignment"]) if "alignment" in f.attrs else None


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
            #: the cache's alignment record (None: unaligned images), see :func:`build_cache`
            self.alignment = json.loads(f.attrs["alignment"]) if "alignment" in f.attrs else None
            self.align_rejected = f["align_rejected"][()] if "align_rejected" in f else None
            classes = json.loads(f.attrs["classes"]) if "classes" in f.attrs else list(CLASSES)
        super().__init__(size, augment_cfg, normalisation, seed, preprocess, classes)
        self.rows = np.arange(len(self._labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._boxes: dict[int, list[Box]] = {}
        for row in boxes:
            self._boxes.setdefault(int(row[0]), []).append(
                Box(self.classes[int(row[1])], float(row[2]), float(row[3]), float(row[4]), float(row[5])))
        self._file = None  # opened lazily per process (h5py handles are not fork-safe)
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.rows]

    def boxes_of(self, i: int) -> list[Box]:
        return list(self._boxes.get(int(self.rows[i]), []))

    def image_u8(self, i: int) -> np.ndarray:
        """Item ``i``'s stored image, uint8 [S, S] (the file is opened once per process: a handle
        inherited through ``fork`` is never used)."""
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file["images"][int(self.rows[i])]

    def pixels(self, i: int) -> tuple[np.ndarray, list[Box]]:
        """Item ``i``'s stored uint8 image [S, S] and boxes."""
        return self.image_u8(i), self.boxes_of(i)

    def _labels_of(self, i: int) -> np.ndarray:
        return self._labels[self.rows[i]]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_file"] = None
        d["_pid"] = None
        return d
