"""Pipeline :class:`~cxrviewer.core.pipeline.Results` to and from HDF5 (h5py).

Layout (format version 1; maps are ``[.., h, w]`` at ``map_shape`` in original-image
coordinates, boxes in original pixels)::

    /                      attrs: format_version, study_id, source_path, pixel_sha256,
                           image_shape [H, W], map_shape [h, w], classes (JSON list),
                           models (JSON {role: manifest summary}), timings (JSON {stage: s}),
                           device, notices (JSON list), cxrviewer_version, created
    /probabilities         float32 [C]                      (only when a classifier ran)
    /cam/cam               float32 [C, h, w]  raw CAM S_c    (disease-masks Eq. 1)
    /cam/gradcam           float32 [C, h, w]  Grad-CAM
    /attention_mining      attrs: steps
        final              float32 [C, h, w]  H_f           (iterative-attention-mining Eq. 8)
        steps/<class>      float32 [T, h, w]  H_t           (Eq. 7)
        erased/<class>     uint8   [T, h, w]  1 = erased up to step t (1 - M_t)
    /contrast              attrs: classes (JSON), paired_normal_id
        map                float32 [h, w]     dM            (cia-net Eq. 3)
        grid               float32 [C, h, w]  grid probabilities (nearest-upsampled)
        grid_raw           float32 [C, gh, gw]
        paired_normal      uint8   [S, S]     the paired normal image (bank frame)
    /disease_mask          attrs: source ("dm" | "classifier" | "pdm")
        psi                float32 [C, h, w]
        dm_probabilities   float32 [C];  dm_cam float32 [C, h, w]   (dm bundle only)
    /alignment
        aligned_image      float32 [Ha, Wa] in [0, 1]
        affine             float64 [2, 3]  (F.affine_grid convention, normalised coords)
        params             float32 [5]     (s_x, s_y, t_x, t_y, theta)
    /segmentation          attrs: classes (JSON)
        masks              uint8   [3, h, w]  left lung, right lung, heart
    /boxes/<source>        source in cam | am | cia
        xywh               float64 [N, 4]
        score              float64 [N]  (NaN = none)
        label              str     [N]

Every group is always present (empty when its stage did not run). The file is
written to a temporary name in the same folder and ``os.replace``d into place.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CxrError
from ..geometry import Box

FORMAT_VERSION = 1
GROUPS = ("cam", "attention_mining", "contrast", "disease_mask", "alignment", "segmentation", "boxes")
_STR = h5py.string_dtype(encoding="utf-8")


class ResultsFileError(CxrError):
    """A results file cannot be written or read."""


def _put(g: h5py.Group, name: str, arr: np.ndarray | None) -> None:
    if arr is None:
        return
    a = np.ascontiguousarray(arr)
    if a.ndim >= 2 and a.size >= 4096:
        g.create_dataset(name, data=a, compression="lzf", shuffle=True, chunks=True)
    else:
        g.create_dataset(name, data=a)


def _get(g: h5py.Group, name: str) -> np.ndarray | None:
    return g[name][()] if name in g else None


def write_results(results: Any, path: str | os.PathLike) -> Path:
    """Write ``results`` (a :class:`~cxrviewer.core.pipeline.Results`) to ``path`` atomically."""
    from ... import __version__

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".h5.tmp", dir=p.parent)
    os.close(fd)
    r = results
    try:
        with h5py.File(tmp, "w") as f:
            a = f.attrs
            a["format_version"] = FORMAT_VERSION
            a["study_id"] = r.study_id
            a["source_path"] = r.source_path
            a["pixel_sha256"] = r.pixel_sha256
            a["image_shape"] = np.asarray(r.image_shape, np.int64)
            a["map_shape"] = np.asarray(r.map_shape, np.int64)
            a["classes"] = json.dumps(list(r.classes))
            a["models"] = json.dumps(r.models)
            a["timings"] = json.dumps(r.timings)
            a["device"] = r.device
            a["notices"] = json.dumps(list(r.notices))
            a["cxrviewer_version"] = __version__
            a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            g = {name: f.create_group(name) for name in GROUPS}
            _put(f, "probabilities", r.probabilities)
            _put(g["cam"], "cam", r.cam)
            _put(g["cam"], "gradcam", r.gradcam)
            am = g["attention_mining"]
            _put(am, "final", r.am_final)
            steps, erased = am.create_group("steps"), am.create_group("erased")
            for name, arr in r.am_steps.items():
                _put(steps, name, arr)
            for name, arr in r.am_erased.items():
                _put(erased, name, arr)
            if r.am_steps:
                am.attrs["steps"] = int(next(iter(r.am_steps.values())).shape[0])
            c = g["contrast"]
            _put(c, "map", r.contrast)
            _put(c, "grid", r.cia_grid)
            _put(c, "grid_raw", r.cia_grid_raw)
            _put(c, "paired_normal", r.paired_normal)
            c.attrs["classes"] = json.dumps(list(r.cia_classes))
            if r.paired_normal_id is not None:
                c.attrs["paired_normal_id"] = r.paired_normal_id
            d = g["disease_mask"]
            _put(d, "psi", r.disease_mask)
            _put(d, "dm_probabilities", r.dm_probabilities)
            _put(d, "dm_cam", r.dm_cam)
            if r.disease_mask_source is not None:
                d.attrs["source"] = r.disease_mask_source
            al = g["alignment"]
            _put(al, "aligned_image", r.aligned_image)
            _put(al, "affine", r.affine)
            _put(al, "params", r.alignment_params)
            s = g["segmentation"]
            _put(s, "masks", r.segmentation)
            s.attrs["classes"] = json.dumps(list(r.segmentation_classes))
            for source, boxes in r.boxes.items():
                bg = g["boxes"].create_group(source)
                bg.create_dataset("xywh", data=np.asarray([[b.x, b.y, b.w, b.h] for b in boxes],
                                                          np.float64).reshape(-1, 4))
                bg.create_dataset("score", data=np.asarray(
                    [np.nan if b.score is None else b.score for b in boxes], np.float64))
                bg.create_dataset("label", data=np.asarray([b.label for b in boxes], dtype=object), dtype=_STR)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, p)
    except OSError as exc:
        raise ResultsFileError(f"cannot write results: {exc}", path=str(p)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def read_results(path: str | os.PathLike) -> Any:
    """Read a results file back into a :class:`~cxrviewer.core.pipeline.Results`.

    The features kept for on-demand attention mining are not stored, so
    ``Pipeline.compute_class`` needs a fresh run for classes not in the file.
    """
    from ..pipeline import Results

    p = Path(path)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise ResultsFileError(f"not a readable results file ({exc})", path=str(p)) from exc
    with f:
        a = f.attrs
        version = int(a.get("format_version", -1))
        if version < 1 or version > FORMAT_VERSION:
            raise ResultsFileError(f"results format version {version} is not supported "
                                   f"(this cxrviewer reads 1..{FORMAT_VERSION})", path=str(p))
        missing = [g for g in GROUPS if g not in f]
        if missing:
            raise ResultsFileError(f"results file lacks group(s) {missing}", path=str(p))
        am, c, d, al, s = (f[n] for n in ("attention_mining", "contrast", "disease_mask", "alignment",
                                          "segmentation"))
        boxes: dict[str, list[Box]] = {}
        for source, bg in f["boxes"].items():
            xywh = bg["xywh"][()]
            score = bg["score"][()]
            labels = bg["label"].asstr()[()] if len(bg["label"]) else []
            boxes[source] = [Box(str(lab), float(x), float(y), float(w), float(h),
                                 None if np.isnan(sc) else float(sc))
                             for lab, (x, y, w, h), sc in zip(labels, xywh, score)]
        r = Results(
            study_id=str(a["study_id"]),
            source_path=str(a["source_path"]),
            pixel_sha256=str(a["pixel_sha256"]),
            image_shape=tuple(int(v) for v in a["image_shape"]),
            map_shape=tuple(int(v) for v in a["map_shape"]),
            classes=tuple(json.loads(a["classes"])),
            probabilities=_get(f, "probabilities"),
            cam=_get(f["cam"], "cam"),
            gradcam=_get(f["cam"], "gradcam"),
            am_final=_get(am, "final"),
            am_steps={k: v[()] for k, v in am["steps"].items()} if "steps" in am else {},
            am_erased={k: v[()] for k, v in am["erased"].items()} if "erased" in am else {},
            contrast=_get(c, "map"),
            cia_classes=tuple(json.loads(c.attrs.get("classes", "[]"))),
            cia_grid=_get(c, "grid"),
            cia_grid_raw=_get(c, "grid_raw"),
            paired_normal=_get(c, "paired_normal"),
            paired_normal_id=str(c.attrs["paired_normal_id"]) if "paired_normal_id" in c.attrs else None,
            disease_mask=_get(d, "psi"),
            disease_mask_source=str(d.attrs["source"]) if "source" in d.attrs else None,
            dm_probabilities=_get(d, "dm_probabilities"),
            dm_cam=_get(d, "dm_cam"),
            segmentation=_get(s, "masks"),
            segmentation_classes=tuple(json.loads(s.attrs.get("classes", "[]"))),
            aligned_image=_get(al, "aligned_image"),
            affine=_get(al, "affine"),
            alignment_params=_get(al, "params"),
            boxes=boxes,
            timings={k: float(v) for k, v in json.loads(a["timings"]).items()},
            device=str(a["device"]),
            models=json.loads(a["models"]),
            notices=list(json.loads(a.get("notices", "[]"))),
            format_version=version,
        )
    return r
