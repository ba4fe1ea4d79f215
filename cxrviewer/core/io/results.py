""":class:`~cxrviewer.core.results.Results` to and from HDF5 (h5py).

Layout, format version 2 (generated from the explainer registry: one group per explainer
that ran, one dataset per declared map)::

    /                      attrs: format_version, study_id, source_path, pixel_sha256,
                           image_shape [H, W], map_shape [h, w], classes (JSON list),
                           models (JSON {role: manifest summary}), timings (JSON {stage: s}),
                           device, notices (JSON list), cxrviewer_version, created,
                           default_box_method (optional: the app's default box method;
                           absent in older files -> None, see :func:`results_summary`)
    /probabilities         float32 [C]                      (only when a classifier ran)
    /explainers/<name>     attrs: the explainer's attributes (JSON), e.g. classes, source
        <map>              a map as the explainer declared it (e.g. cam [C, h, w] float32)
        <map>/<class>      a step map {class: [T, h, w]} as a group of per-class datasets
    /boxes/<name>          boxes proposed by explainer <name> (``prior``: the fixed median box
                           per class, a reference; its fractions are in /explainers/prior attrs)
        xywh               float64 [N, 4]  original pixels
        score              float64 [N]     (NaN = none)
        label              str     [N]

Version 1 files (one fixed group per method: ``cam``, ``attention_mining``, ``contrast``,
``disease_mask``, ``alignment``, ``segmentation``) are read by :func:`_read_v1_maps`. The file
is written to a temporary name in the same folder and ``os.replace``d into place.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CxrError
from ..geometry import Box
from ..results import RESULTS_FORMAT_VERSION, Results
from ..atomic import mkstemp_beside

FORMAT_VERSION = RESULTS_FORMAT_VERSION
GROUPS = ("explainers", "boxes")
_STR = h5py.string_dtype(encoding="utf-8")


class ResultsFileError(CxrError):
    """A results file cannot be written or read."""


def _put(g: h5py.Group, name: str, arr: Any) -> None:
    if arr is None:
        return
    if isinstance(arr, dict):
        sub = g.create_group(name)
        for k, v in arr.items():
            _put(sub, k, v)
        return
    a = np.ascontiguousarray(arr)
    if a.ndim >= 2 and a.size >= 4096:
        g.create_dataset(name, data=a, compression="lzf", shuffle=True, chunks=True)
    else:
        g.create_dataset(name, data=a)


def _get(g: h5py.Group, name: str) -> Any:
    if name not in g:
        return None
    item = g[name]
    if isinstance(item, h5py.Group):
        return {k: v[()] for k, v in item.items()}
    return item[()]


def _write_root(f: h5py.File, r: Results, default_box_method: str | None) -> None:
    from ... import __version__

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
    if default_box_method:
        a["default_box_method"] = default_box_method


def _write_boxes(g: h5py.Group, source: str, boxes: list[Box]) -> None:
    bg = g.create_group(source)
    bg.create_dataset("xywh", data=np.asarray([[b.x, b.y, b.w, b.h] for b in boxes], np.float64).reshape(-1, 4))
    bg.create_dataset("score", data=np.asarray([np.nan if b.score is None else b.score for b in boxes], np.float64))
    bg.create_dataset("label", data=np.asarray([b.label for b in boxes], dtype=object), dtype=_STR)


def write_results(results: Results, path: str | os.PathLike, *, default_box_method: str | None = None) -> Path:
    """Write ``results`` to ``path`` atomically (format version 2); ``default_box_method`` (the
    caller's :func:`cxrviewer.core.panels.default_box_method`) becomes a root attribute."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(p, ".h5.tmp")
    os.close(fd)
    r = results
    try:
        with h5py.File(tmp, "w") as f:
            _write_root(f, r, default_box_method)
            _put(f, "probabilities", r.probabilities)
            eg, bg = f.create_group("explainers"), f.create_group("boxes")
            for name, maps in r.maps.items():
                g = eg.create_group(name)
                g.attrs["attrs"] = json.dumps(r.attrs.get(name, {}))
                for k, v in maps.items():
                    _put(g, k, v)
            for source, boxes in r.boxes.items():
                _write_boxes(bg, source, boxes)
        os.replace(tmp, p)
    except OSError as exc:
        raise ResultsFileError(f"cannot write results: {exc}", path=str(p)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def _read_boxes(g: h5py.Group) -> dict[str, list[Box]]:
    boxes: dict[str, list[Box]] = {}
    for source, bg in g.items():
        xywh = bg["xywh"][()]
        score = bg["score"][()]
        labels = bg["label"].asstr()[()] if len(bg["label"]) else []
        boxes[source] = [Box(str(lab), float(x), float(y), float(w), float(h), None if np.isnan(sc) else float(sc))
                         for lab, (x, y, w, h), sc in zip(labels, xywh, score)]
    return boxes


#: version 1 group/dataset -> (explainer, map); box sources renamed to explainer names
_V1_MAPS = {("cam", "cam"): ("cam", "cam"), ("cam", "gradcam"): ("gradcam", "gradcam"),
            ("attention_mining", "final"): ("attention_mining", "final"),
            ("attention_mining", "steps"): ("attention_mining", "steps"),
            ("attention_mining", "erased"): ("attention_mining", "erased"),
            ("contrast", "map"): ("contrast", "contrast"), ("contrast", "grid"): ("contrast", "grid"),
            ("contrast", "grid_raw"): ("contrast", "grid_raw"),
            ("contrast", "paired_normal"): ("contrast", "paired_normal"),
            ("disease_mask", "psi"): ("disease_mask", "psi"),
            ("disease_mask", "dm_probabilities"): ("disease_mask", "dm_probabilities"),
            ("disease_mask", "dm_cam"): ("disease_mask", "dm_cam"),
            ("alignment", "aligned_image"): ("alignment", "aligned_image"),
            ("alignment", "affine"): ("alignment", "affine"), ("alignment", "params"): ("alignment", "params"),
            ("segmentation", "masks"): ("segmentation", "masks")}
_V1_BOXES = {"am": "attention_mining", "cia": "contrast"}
_V1_GROUPS = ("cam", "attention_mining", "contrast", "disease_mask", "alignment", "segmentation", "boxes")


def _read_v1_maps(f: h5py.File) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Maps and attributes of a version 1 file, in the version 2 naming."""
    maps: dict[str, dict[str, Any]] = {}
    for (group, ds), (ex, name) in _V1_MAPS.items():
        value = _get(f[group], ds)
        if value is not None:
            maps.setdefault(ex, {})[name] = value
    attrs: dict[str, dict[str, Any]] = {}
    c, d, s = f["contrast"], f["disease_mask"], f["segmentation"]
    if "contrast" in maps:
        attrs["contrast"] = {"classes": json.loads(c.attrs.get("classes", "[]"))}
        if "paired_normal_id" in c.attrs:
            attrs["contrast"]["paired_normal_id"] = str(c.attrs["paired_normal_id"])
    if "disease_mask" in maps and "source" in d.attrs:
        attrs["disease_mask"] = {"source": str(d.attrs["source"])}
    if "segmentation" in maps:
        attrs["segmentation"] = {"classes": json.loads(s.attrs.get("classes", "[]"))}
    am = maps.get("attention_mining")
    if am is not None:
        am.setdefault("steps", {})
        am.setdefault("erased", {})
        if "steps" in f["attention_mining"].attrs:
            attrs["attention_mining"] = {"steps": int(f["attention_mining"].attrs["steps"])}
    return maps, attrs


def _read_v2_maps(f: h5py.File) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    maps: dict[str, dict[str, Any]] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for name, g in f["explainers"].items():
        maps[name] = {k: _get(g, k) for k in g}
        a = json.loads(g.attrs.get("attrs", "{}"))
        if a:
            attrs[name] = a
    return maps, attrs


def read_results(path: str | os.PathLike) -> Results:
    """Read a results file (format version 1 or 2) back into a :class:`Results`.

    The features kept for on-demand attention mining are not stored, so
    ``Pipeline.compute_class`` needs a fresh run for classes not in the file.
    """
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
        groups = _V1_GROUPS if version == 1 else GROUPS
        missing = [g for g in groups if g not in f]
        if missing:
            raise ResultsFileError(f"results file lacks group(s) {missing}", path=str(p))
        maps, attrs = _read_v1_maps(f) if version == 1 else _read_v2_maps(f)
        boxes = _read_boxes(f["boxes"])
        if version == 1:
            boxes = {_V1_BOXES.get(k, k): v for k, v in boxes.items()}
        return Results(
            study_id=str(a["study_id"]), source_path=str(a["source_path"]), pixel_sha256=str(a["pixel_sha256"]),
            image_shape=tuple(int(v) for v in a["image_shape"]), map_shape=tuple(int(v) for v in a["map_shape"]),
            classes=tuple(json.loads(a["classes"])), probabilities=_get(f, "probabilities"), maps=maps,
            attrs=attrs, boxes=boxes, timings={k: float(v) for k, v in json.loads(a["timings"]).items()},
            device=str(a["device"]), models=json.loads(a["models"]), notices=list(json.loads(a.get("notices", "[]"))),
            format_version=version)


def results_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Study path, id, pixel hash, classes, probabilities and default box method (None when the
    file does not say) of a results file (no maps read)."""
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            probs = f["probabilities"][()] if "probabilities" in f else None
            return {"source_path": str(a.get("source_path", "")), "study_id": str(a.get("study_id", "")),
                    "pixel_sha256": str(a.get("pixel_sha256", "")),
                    "classes": list(json.loads(a.get("classes", "[]"))),
                    "default_box_method": str(a["default_box_method"]) if "default_box_method" in a else None,
                    "probabilities": None if probs is None else np.asarray(probs, np.float32)}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ResultsFileError(f"not a readable results file ({exc})", path=str(path)) from exc
