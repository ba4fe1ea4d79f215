""":class:`~cxrviewer.core.results.Results` to and from HDF5 (h5py).

Layout, format version 3 (generated from the explainer registry: one group per explainer
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

Version 3 stores a float map in one of three forms, told apart by its ``encoding`` attribute:
``native`` (the grid the network computed, e.g. cam [C, 16, 16], with a JSON ``recipe``:
map_shape, frame_shape, crop box, inverse affine, bilinear/nearest; redrawn on read by
:func:`cxrviewer.core.results.remap`), ``quantised`` (uint16 steps 0..``QUANT_LEVELS`` with
per-slice ``offset`` and ``scale`` attributes) or none (stored as is: masks, images, small
arrays, maps with NaN/Inf). Readers get float32 maps at ``map_shape`` within 1e-3 of their range.
Version 2 files hold every map as is at ``map_shape``.

Version 1 files (one fixed group per method: ``cam``, ``attention_mining``, ``contrast``,
``disease_mask``, ``alignment``, ``segmentation``) are read by :func:`_read_v1_maps`. The file
is written to a temporary name in the same folder and ``os.replace``d into place;
``source_path`` is stored absolute when it names an existing file.

Reading validates (a results file may come from anywhere): :func:`read_results` and
:func:`results_summary` raise only :class:`ResultsFileError`, with a one-line message naming
the file, whatever it holds. Before any dataset is read, a dry pass checks every declaration
against the ``MAX_*`` limits below and the file's own ``image_shape``, ``map_shape`` and class
count: sides <= 4096, leading axes <= max(classes, 64), maps in the original frame at exactly
``map_shape``, <= 64 Mi elements and <= 512 MiB in all (counted per link, so hard links to one
big dataset do not escape), chunks <= 64 MiB and <= 65536 per dataset (declared, written or
not), only deflate/LZF/shuffle/fletcher32 filters with every compressed chunk's inflated size
checked first (a compression bomb is refused, not inflated), no virtual or external storage,
only hard links (soft and external links are refused, never followed), numeric types only for
maps. JSON attributes must be text of <= 1 MiB holding the expected list or object, with no
NaN/Infinity (also not by overflow). Probabilities must be [C] finite floats: **NaN/Inf are
refused** (the app never writes them; a classifier producing them is refused upstream), as are
non-finite box coordinates or negative sizes (a NaN box score means "none", as written); a box
crossing the edge of ``image_shape`` is clipped to it and one wholly outside the image is refused.
Control characters and bidi overrides in the study id, device and notices become U+FFFD; class
names holding them are refused. A stored ``source_path`` that does not exist falls back to a
file of the same name next to the results file (:func:`resolve_source`).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import stat
import zlib
from pathlib import Path, PureWindowsPath
from typing import Any

import h5py
import numpy as np

from ..errors import CxrError
from ..geometry import Box
from ..results import RESULTS_FORMAT_VERSION, MapRecipe, NativeLog, Results, remap, slice_digest
from ..atomic import mkstemp_beside
from ..jsonsafe import loads_strict
from ._common import MAX_PIXELS

FORMAT_VERSION = RESULTS_FORMAT_VERSION
GROUPS = ("explainers", "boxes")
_STR = h5py.string_dtype(encoding="utf-8")
log = logging.getLogger(__name__)


class ResultsFileError(CxrError):
    """A results file cannot be written or read."""


#: a map is stored on its native grid only when redrawing it matches the map in memory within
#: this fraction of each slice's range
NATIVE_TOL = 2e-4
#: quantised maps keep this many steps per slice: error <= range / (2 * QUANT_LEVELS) (< 1e-3)
QUANT_LEVELS = 1023
#: native grids larger than this on a side are neither written nor read (maps come from ~16-64)
MAX_NATIVE_SIDE = 256


def _put(g: h5py.Group, name: str, arr: Any, log: NativeLog | None = None) -> None:
    """Store ``arr`` (a dict: a group of them) as ``g/name`` in its most compact exact-enough form."""
    if arr is None:
        return
    if isinstance(arr, dict):
        sub = g.create_group(name)
        for k, v in arr.items():
            _put(sub, k, v, log)
        return
    data, attrs = _encode(np.ascontiguousarray(arr), log)
    if data.ndim >= 2 and data.size >= 4096:
        h, w = data.shape[-2:]
        chunks = (1,) * (data.ndim - 2) + (h, w) if h * w * data.itemsize <= 2**24 else True
        kind = dict(compression="gzip", compression_opts=4) if data.dtype.kind in "biu" else dict(compression="lzf")
        ds = g.create_dataset(name, data=data, shuffle=data.itemsize > 1, chunks=chunks, **kind)
    else:
        ds = g.create_dataset(name, data=data)
    for k, v in attrs.items():
        ds.attrs[k] = v


def _encode(a: np.ndarray, log: NativeLog | None) -> tuple[np.ndarray, dict[str, Any]]:
    """``(data, attributes)`` of one array: a float map drawn by the Mapper as its native grid
    (``encoding=native``), another float map quantised (``encoding=quantised``), else as is."""
    if a.dtype.kind != "f" or a.ndim < 2 or a.size < 4096 or 0 in a.shape:
        return a, {}
    if log is not None:
        native = _native_of(a, log)
        if native is not None:
            return native
    return _quantise(a)


def _slice_tol(flat: np.ndarray, frac: float) -> np.ndarray:
    """Per-slice tolerance: ``frac`` of each slice's range (plus float32 rounding of its values)."""
    hi, lo = flat.max(axis=(1, 2)).astype(np.float64), flat.min(axis=(1, 2)).astype(np.float64)
    return frac * (hi - lo) + 1e-6 * np.maximum(np.abs(hi), np.abs(lo))


def _native_of(a: np.ndarray, log: NativeLog) -> tuple[np.ndarray, dict[str, Any]] | None:
    """``a``'s native grid and recipe from ``log`` when redrawing it reproduces ``a`` (checked).

    A slice whose digest is that of a logged drawing (:func:`~cxrviewer.core.results.slice_digest`)
    is that drawing, so its native grid needs no redraw of its own; the numpy redraw is compared
    with one such slice per stack (the recipe is the same linear map for every slice) and with
    every slice without an exact match (changed since it was drawn, or a fingerprint collision)."""
    H, W = a.shape[-2:]
    flat = a.reshape(-1, H, W)
    if not np.all(np.isfinite(flat)):
        return None
    cands = [log.find(s) for s in flat]
    if not all(cands):
        return None
    recipe, shape = cands[0][0][1], cands[0][0][0].shape
    cands = [[(n, c) for n, r, c in cs if r == recipe and n.shape == shape] for cs in cands]
    if not all(cands) or max(shape) > MAX_NATIVE_SIDE or recipe.map_shape != (H, W):
        return None
    native = np.empty((len(flat), *shape), np.float32)
    exact = []
    for i, (s, cs) in enumerate(zip(flat, cands)):
        digest = slice_digest(s)
        hit = next((n for n, c in cs if c == digest), None)
        native[i] = cs[0][0] if hit is None else hit
        exact.append(hit is not None)
    check = [i for i, e in enumerate(exact) if not e] + [i for i, e in enumerate(exact) if e][:1]
    try:
        tol = _slice_tol(flat[check], NATIVE_TOL)
        ok = np.abs(remap(native[check], recipe) - flat[check]).max(axis=(1, 2)) <= tol
        for j in np.flatnonzero(~ok):  # same fingerprint, another native (e.g. constant maps)
            i = check[j]
            for n, _ in cands[i][1:]:
                if np.abs(remap(n[None], recipe)[0] - flat[i]).max() <= tol[j]:
                    native[i], ok[j] = n, True
                    break
    except ValueError:  # a recipe the numpy redraw does not cover (e.g. shrinking)
        return None
    if not ok.all():
        return None
    return native.reshape(*a.shape[:-2], *shape), {"encoding": "native", "recipe": _json(recipe.to_json())}


def _quantise(a: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """uint16 steps (0..QUANT_LEVELS) of ``(slice - offset) / scale`` per 2-D slice: error <=
    scale / 2 = range / (2 * QUANT_LEVELS); ``a`` as is when it holds NaN/Inf."""
    H, W = a.shape[-2:]
    flat = a.reshape(-1, H, W)
    lo, hi = flat.min(axis=(1, 2)).astype(np.float64), flat.max(axis=(1, 2)).astype(np.float64)
    scale = (hi - lo) / QUANT_LEVELS
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(scale))):
        return a, {}
    q = np.empty(flat.shape, np.uint16)
    for i, s in enumerate(flat):
        step = np.float32(scale[i] if scale[i] > 0 else 1.0)
        q[i] = np.clip(np.rint((s - np.float32(lo[i])) / step), 0, QUANT_LEVELS)
    return q.reshape(a.shape), {"encoding": "quantised", "offset": lo, "scale": scale}


def _plain(obj: Any) -> Any:
    """``obj`` as strict JSON values: numpy scalars and arrays as Python ones, NaN/Inf as null."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json(obj: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens, which :func:`read_results` refuses)."""
    try:
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_plain(obj), allow_nan=False, default=str)


def _write_root(f: h5py.File, r: Results, default_box_method: str | None) -> None:
    from ... import __version__

    a = f.attrs
    a["format_version"] = FORMAT_VERSION
    a["study_id"] = r.study_id
    a["source_path"] = _absolute_source(r.source_path)
    a["pixel_sha256"] = r.pixel_sha256
    a["image_shape"] = np.asarray(r.image_shape, np.int64)
    a["map_shape"] = np.asarray(r.map_shape, np.int64)
    a["classes"] = _json(list(r.classes))
    a["models"] = _json(r.models)
    a["timings"] = _json({k: float(v) for k, v in r.timings.items() if math.isfinite(float(v))})
    a["device"] = r.device
    a["notices"] = _json(list(r.notices))
    a["cxrviewer_version"] = __version__
    a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if default_box_method:
        a["default_box_method"] = default_box_method


def _absolute_source(source: str) -> str:
    """``source`` made absolute when it names an existing file (a label such as ``synthetic`` is
    kept), so a results file opened from another folder still finds its study."""
    return os.path.abspath(source) if source and os.path.isfile(source) else source


def _write_boxes(g: h5py.Group, source: str, boxes: list[Box]) -> None:
    bg = g.create_group(source)
    bg.create_dataset("xywh", data=np.asarray([[b.x, b.y, b.w, b.h] for b in boxes], np.float64).reshape(-1, 4))
    bg.create_dataset("score", data=np.asarray([np.nan if b.score is None else b.score for b in boxes], np.float64))
    bg.create_dataset("label", data=np.asarray([b.label for b in boxes], dtype=object), dtype=_STR)


def write_results(results: Results, path: str | os.PathLike, *, default_box_method: str | None = None) -> Path:
    """Write ``results`` to ``path`` atomically (format version 3); ``default_box_method`` (the
    caller's :func:`cxrviewer.core.panels.default_box_method`) becomes a root attribute.

    Float maps are stored on the native grid they were computed on when the results' NativeLog
    knows it and redrawing reproduces the map (within ``NATIVE_TOL`` of each slice's range),
    else quantised to ``QUANT_LEVELS`` steps per slice; :func:`read_results` gives the arrays
    at full size either way."""
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
            log = r.native
            for name, maps in r.maps.items():
                g = eg.create_group(name)
                g.attrs["attrs"] = _json(r.attrs.get(name, {}))
                for k, v in maps.items():
                    _put(g, k, v, log if isinstance(log, NativeLog) else None)
            for source, boxes in r.boxes.items():
                _write_boxes(bg, source, boxes)
        os.replace(tmp, p)
    except OSError as exc:
        raise ResultsFileError(f"cannot write results: {exc}", path=str(p)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


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


# ---- validating reader ----------------------------------------------------------------------
#: limits every file is checked against before anything is read (see :func:`read_results`)
MAX_IMAGE_SIDE = 65_536          # image_shape axes
MAX_MAP_SIDE = 4096              # map_shape axes and the last two axes of any stored map
MAX_ELEMENTS = 64 * 2**20        # elements across all datasets read from one file
MAX_BYTES = 512 * 2**20          # bytes across all datasets read from one file
MAX_CHUNK_BYTES = 64 * 2**20     # one chunk, decompressed
MAX_CHUNKS = 65_536              # chunks of one dataset
MAX_JSON_BYTES = 2**20           # one JSON attribute
MAX_CLASSES = 1024
MAX_MEMBERS = 256                # members of one group (explainers, maps, step classes, box sources)
MAX_BOXES = 100_000              # boxes of one source
MAX_LABEL = 256                  # characters of one box label
MAX_STEPS = 64                   # leading axes of a map: classes or steps, whichever is larger
MAX_NDIM = 4
_LZF = 32000  # h5py's LZF filter
_FILTERS = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32, _LZF}
#: maps in the original frame at ``map_shape`` (their last two axes must equal it)
_ORIGINAL_FRAME = {"cam", "gradcam", "final", "steps", "erased", "psi", "dm_cam", "posterior", "grid", "contrast"}
_MISSING = object()



#: control characters and bidirectional overrides, kept out of text shown to a person
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _clean(text: str) -> str:
    """``text`` with control characters and bidi overrides replaced by U+FFFD."""
    return _UNSAFE.sub("\ufffd", text)


class _Reader:
    """Checked access to one open results file: every read is preceded by a check of declared
    types, shapes, links, filters and sizes against the limits above and the file's own
    ``image_shape``, ``map_shape`` and class count; a failed check raises :class:`ResultsFileError`."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self.f, self.path = f, path
        self.elements = self.nbytes = 0
        self.map_shape: tuple[int, int] | None = None
        self.image_shape: tuple[int, int] | None = None
        self.n_classes = 0
        self.version = FORMAT_VERSION
        self.log = NativeLog()  # the native grids read, so writing the results again keeps them native
        self.dry = False  # a dry pass checks every declaration and reads no dataset

    def fail(self, msg: str) -> ResultsFileError:
        return ResultsFileError(_one_line(msg), path=str(self.path))

    # -- attributes --
    def _attr(self, obj: Any, name: str, default: Any) -> Any:
        if name not in obj.attrs:
            if default is _MISSING:
                raise self.fail(f"attribute {name!r} is missing")
            return default
        return obj.attrs.get_id(name)

    def attr_str(self, obj: Any, name: str, default: Any = _MISSING, limit: int = MAX_JSON_BYTES) -> Any:
        """A scalar string attribute (at most ``limit`` bytes)."""
        aid = self._attr(obj, name, default)
        if not isinstance(aid, h5py.h5a.AttrID):
            return aid
        info = h5py.check_string_dtype(aid.dtype)
        if info is None or aid.shape != ():
            raise self.fail(f"attribute {name!r} is not a text string ({aid.dtype}, shape {aid.shape})")
        if info.length is not None and info.length > limit:
            raise self.fail(f"attribute {name!r} is larger than {limit} bytes")
        value = obj.attrs[name]
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"attribute {name!r} is not UTF-8 text") from exc
        if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > limit:
            raise self.fail(f"attribute {name!r} is not text of at most {limit} bytes")
        return value

    def attr_json(self, obj: Any, name: str, kind: type, default: Any = _MISSING) -> Any:
        """A JSON string attribute holding a ``kind`` (list or dict); NaN/Infinity are refused."""
        text = self.attr_str(obj, name, _MISSING if default is _MISSING else None)
        if text is None:
            return default
        try:
            value = loads_strict(text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"attribute {name!r} is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(value, kind):
            raise self.fail(f"attribute {name!r} is a JSON {type(value).__name__}, not a {kind.__name__}")
        return value

    def attr_ints(self, obj: Any, name: str, n: int | None, default: Any = _MISSING) -> Any:
        """An integer attribute: a scalar (``n`` None) or ``n`` integers."""
        aid = self._attr(obj, name, default)
        if not isinstance(aid, h5py.h5a.AttrID):
            return aid
        want = () if n is None else (n,)
        if aid.dtype.kind not in "iu" or aid.shape != want:
            raise self.fail(f"attribute {name!r} must be {'an integer' if n is None else f'{n} integers'} "
                            f"(got {aid.dtype}, shape {aid.shape})")
        value = np.asarray(obj.attrs[name])
        return int(value) if n is None else tuple(int(v) for v in value)

    # -- links and groups --
    def child(self, g: h5py.Group, name: str, kind: Any, required: bool = False) -> Any:
        """Member ``name`` of ``g`` as a ``kind`` (Group or Dataset); links other than hard ones refused."""
        link = g.get(name, getlink=True)
        if link is None:
            if required:
                raise self.fail(f"{g.name.rstrip('/')}/{name} is missing")
            return None
        if not isinstance(link, h5py.HardLink):
            raise self.fail(f"{g.name.rstrip('/')}/{name} is a {type(link).__name__}; only hard links are read")
        obj = g[name]
        if not isinstance(obj, kind):
            want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.fail(f"{obj.name} is a {type(obj).__name__}, not a {want}")
        return obj

    def members(self, g: h5py.Group) -> list[str]:
        if len(g) > MAX_MEMBERS:
            raise self.fail(f"{g.name} has {len(g)} members (at most {MAX_MEMBERS} are read)")
        return list(g.keys())

    # -- datasets --
    def dataset(self, ds: h5py.Dataset, kinds: str = "biuf") -> np.ndarray:
        """The array of ``ds`` after checking its declaration against the limits."""
        where = ds.name
        if ds.shape is None:
            raise self.fail(f"{where} has no dataspace (an empty dataset)")
        if ds.is_virtual or ds.external:
            raise self.fail(f"{where} refers to other files (virtual or external storage)")
        dt = ds.dtype
        if dt.kind not in kinds or dt.itemsize > 8 or dt.fields is not None or dt.subdtype is not None:
            raise self.fail(f"{where} has type {dt}, expected {'numbers' if 'f' in kinds else kinds}")
        if ds.ndim > MAX_NDIM:
            raise self.fail(f"{where} has {ds.ndim} axes (at most {MAX_NDIM})")
        n = math.prod(ds.shape)
        self.elements += n
        self.nbytes += n * dt.itemsize
        if self.elements > MAX_ELEMENTS or self.nbytes > MAX_BYTES:
            raise self.fail(f"{where} {ds.shape} {dt} exceeds the file's budget of {MAX_ELEMENTS} elements / "
                            f"{MAX_BYTES // 2**20} MiB")
        if self.dry:
            self._check_storage(ds, n)
            return None
        return ds[()]

    def _check_storage(self, ds: h5py.Dataset, n: int) -> None:
        """Chunk size, declared chunk grid, filters and pipeline order; compressed chunks' sizes."""
        if ds.chunks is None or n == 0:
            return
        cbytes = math.prod(ds.chunks) * ds.dtype.itemsize
        if cbytes > MAX_CHUNK_BYTES:
            raise self.fail(f"{ds.name} has chunks of {cbytes} bytes (at most {MAX_CHUNK_BYTES})")
        grid = math.prod(-(-s // c) for s, c in zip(ds.shape, ds.chunks))  # declared, written or not
        if grid > MAX_CHUNKS:
            raise self.fail(f"{ds.name} has {grid} chunks (at most {MAX_CHUNKS})")
        plist = ds.id.get_create_plist()
        codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        bad = [c for c in codes if c not in _FILTERS]
        if bad:
            raise self.fail(f"{ds.name} uses unsupported compression filter(s) {bad}")
        packers = [i for i, c in enumerate(codes) if c in (h5py.h5z.FILTER_DEFLATE, _LZF)]
        after = codes[packers[0] + 1:] if packers else []
        if len(packers) > 1 or any(c != h5py.h5z.FILTER_FLETCHER32 for c in after):
            raise self.fail(f"{ds.name} has an unsupported filter pipeline {codes}")
        if packers:
            self._check_chunks(ds, cbytes, codes, packers[0])

    def _check_chunks(self, ds: h5py.Dataset, cbytes: int, codes: list[int], pos: int) -> None:
        """Refuse a compressed chunk that inflates past its declared size (a compression bomb;
        HDF5's own filters grow their buffer until the stream ends). Deflate is inflated with a
        ceiling, LZF's decoded length is counted without decoding."""
        fletcher = [i for i, c in enumerate(codes) if c == h5py.h5z.FILTER_FLETCHER32]
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            if info.byte_offset is None or (info.filter_mask >> pos) & 1:
                continue
            _mask, raw = ds.id.read_direct_chunk(info.chunk_offset)
            if fletcher and not (info.filter_mask >> fletcher[0]) & 1:
                raw = raw[:-4]
            if codes[pos] == _LZF:
                size = _lzf_length(raw, cbytes)
            else:
                z = zlib.decompressobj()
                try:
                    size = len(z.decompress(raw, cbytes + 1)) + len(z.unconsumed_tail)
                except zlib.error:
                    size = -1
            if size > cbytes:
                raise self.fail(f"{ds.name}: a compressed chunk inflates past its declared {cbytes} bytes")
            if size < 0:
                raise self.fail(f"{ds.name}: a compressed chunk is corrupt")

    # -- the parts of a results file --
    def root(self) -> dict[str, Any]:
        """The root attributes, checked (``format_version`` already read)."""
        f = self.f
        image_shape = self.attr_ints(f, "image_shape", 2)
        map_shape = self.attr_ints(f, "map_shape", 2)
        if not all(0 < v <= MAX_IMAGE_SIDE for v in image_shape) or math.prod(image_shape) > MAX_PIXELS:
            raise self.fail(f"image_shape {image_shape} is out of range (1..{MAX_IMAGE_SIDE} a side, "
                            f"at most {MAX_PIXELS} pixels, as for images the app loads)")
        if not all(0 < v <= MAX_MAP_SIDE for v in map_shape):
            raise self.fail(f"map_shape {map_shape} is out of range (1..{MAX_MAP_SIDE})")
        classes = self.attr_json(f, "classes", list)
        if len(classes) > MAX_CLASSES or not all(isinstance(c, str) and 0 < len(c) <= MAX_LABEL
                                                 and not _UNSAFE.search(c) for c in classes):
            raise self.fail(f"classes must be at most {MAX_CLASSES} non-empty names without control characters")
        timings = self.attr_json(f, "timings", dict)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in timings.values()):
            raise self.fail("timings must map stage names to numbers")
        models = self.attr_json(f, "models", dict)
        if not all(isinstance(v, dict) for v in models.values()):
            raise self.fail("models must map roles to JSON objects")
        notices = self.attr_json(f, "notices", list, [])
        if not all(isinstance(n, str) for n in notices):
            raise self.fail("notices must be a list of strings")
        self.map_shape, self.n_classes = map_shape, len(classes)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        return dict(study_id=_clean(self.attr_str(f, "study_id", limit=4096)),
                    source_path=self.attr_str(f, "source_path", limit=4096),
                    pixel_sha256=self.attr_str(f, "pixel_sha256", limit=128), image_shape=image_shape,
                    map_shape=map_shape, classes=tuple(classes), timings={k: float(v) for k, v in timings.items()},
                    device=_clean(self.attr_str(f, "device", limit=4096)), models=models,
                    notices=[_clean(n) for n in notices])

    def probabilities(self) -> np.ndarray | None:
        """``/probabilities``: [C] finite floats, C the number of classes; NaN/Inf are refused."""
        ds = self.child(self.f, "probabilities", h5py.Dataset)
        if ds is None:
            return None
        if ds.ndim != 1 or ds.dtype.kind != "f" or (self.n_classes and ds.shape[0] != self.n_classes):
            raise self.fail(f"probabilities must be [{self.n_classes}] floats (got {ds.dtype} {ds.shape})")
        p = self.dataset(ds, "f")
        if p is not None and not np.all(np.isfinite(p)):
            raise self.fail("probabilities contain NaN or infinite values")
        return p

    def map_value(self, g: h5py.Group, name: str) -> Any:
        """One stored map: an array, or a group of per-class arrays (a step map)."""
        link = self.child(g, name, (h5py.Group, h5py.Dataset))
        if link is None:
            return None
        if isinstance(link, h5py.Group):
            return {k: self._map_array(self.child(link, k, h5py.Dataset), name) for k in self.members(link)}
        return self._map_array(link, name)

    def _map_array(self, ds: h5py.Dataset, name: str) -> np.ndarray:
        shape = ds.shape or ()
        lead = max(self.n_classes, MAX_STEPS)
        if len(shape) >= 2 and max(shape[-2:]) > MAX_MAP_SIDE:
            raise self.fail(f"{ds.name} {shape} is larger than {MAX_MAP_SIDE} on a side")
        if any(v > lead for v in shape[:-2]):
            raise self.fail(f"{ds.name} {shape}: a leading axis exceeds {lead} (classes or steps)")
        encoding = self.attr_str(ds, "encoding", None, limit=32) if self.version >= 3 else None
        if encoding == "native":
            return self._native(ds)
        if name in _ORIGINAL_FRAME and len(shape) >= 2 and tuple(shape[-2:]) != self.map_shape:
            raise self.fail(f"{ds.name} {shape} does not match map_shape {self.map_shape}")
        if encoding == "quantised":
            return self._dequantise(ds)
        if encoding is not None:
            raise self.fail(f"{ds.name} has an unknown encoding {encoding!r}")
        return self.dataset(ds)

    def _grow(self, ds: h5py.Dataset, n: int) -> None:
        """Count ``n`` more float32 elements (a map decoded to full size) against the budget,
        before anything is allocated."""
        self.elements += n
        self.nbytes += 4 * n
        if self.elements > MAX_ELEMENTS or self.nbytes > MAX_BYTES:
            raise self.fail(f"{ds.name} decodes past the file's budget of {MAX_ELEMENTS} elements / "
                            f"{MAX_BYTES // 2**20} MiB")

    def _native(self, ds: h5py.Dataset) -> np.ndarray | None:
        """A map stored on its native grid (``encoding=native``), redrawn at ``map_shape``."""
        shape = ds.shape or ()
        if not 2 <= len(shape) <= MAX_NDIM or max(shape[-2:]) > MAX_NATIVE_SIDE or ds.dtype.kind != "f":
            raise self.fail(f"{ds.name}: a native map must be [..., h, w] floats with h, w <= {MAX_NATIVE_SIDE} "
                            f"(got {ds.dtype} {shape})")
        try:
            recipe = MapRecipe.from_json(self.attr_json(ds, "recipe", dict), MAX_MAP_SIDE, MAX_IMAGE_SIDE)
        except ValueError as exc:
            raise self.fail(f"{ds.name}: bad recipe ({exc})") from None
        if recipe.map_shape != self.map_shape:
            raise self.fail(f"{ds.name}: recipe map_shape {recipe.map_shape} is not the file's {self.map_shape}")
        self._grow(ds, math.prod(shape[:-2]) * math.prod(recipe.map_shape))
        native = self.dataset(ds, "f")
        if native is None:
            return None
        if not np.all(np.isfinite(native)):
            raise self.fail(f"{ds.name}: a native map holds NaN or infinite values")
        try:
            out = remap(native, recipe)
        except ValueError as exc:
            raise self.fail(f"{ds.name}: cannot redraw ({exc})") from None
        self.log.add(native.reshape(-1, *shape[-2:]), out.reshape(-1, *recipe.map_shape), recipe)
        return out

    def _dequantise(self, ds: h5py.Dataset) -> np.ndarray | None:
        """A quantised map (``encoding=quantised``): ``offset + steps * scale`` per 2-D slice."""
        shape = ds.shape or ()
        if len(shape) < 2 or ds.dtype.kind != "u":
            raise self.fail(f"{ds.name}: a quantised map must be [..., h, w] unsigned integers "
                            f"(got {ds.dtype} {shape})")
        n = math.prod(shape[:-2])
        coef = []
        for key in ("offset", "scale"):
            aid = self._attr(ds, key, _MISSING)
            if aid.dtype.kind != "f" or aid.shape != (n,):
                raise self.fail(f"{ds.name}: attribute {key!r} must be {n} floats")
            coef.append(np.asarray(ds.attrs[key], np.float64).reshape(-1, 1, 1))
            if not np.all(np.isfinite(coef[-1])):
                raise self.fail(f"{ds.name}: attribute {key!r} holds NaN or infinite values")
        self._grow(ds, math.prod(shape))
        q = self.dataset(ds, "u")
        if q is None:
            return None
        h, w = shape[-2:]
        q = q.reshape(-1, h, w)
        out = np.empty(q.shape, np.float32)
        for i in range(len(q)):  # float64 arithmetic one slice at a time
            out[i] = coef[0][i] + q[i] * coef[1][i]
        return out.reshape(shape)

    def boxes(self, g: h5py.Group) -> dict[str, list[Box]]:
        """``/boxes/<source>``: finite xywh with w, h >= 0; a NaN score means none."""
        out: dict[str, list[Box]] = {}
        for source in self.members(g):
            bg = self.child(g, source, h5py.Group)
            parts = [self.child(bg, k, h5py.Dataset, required=True) for k in ("xywh", "score", "label")]
            n = parts[1].shape[0] if parts[1].shape and parts[1].ndim == 1 else -1
            if not (0 <= n <= MAX_BOXES and parts[0].shape == (n, 4) and parts[2].shape == (n,)):
                raise self.fail(f"{bg.name}: xywh [N, 4], score [N] and label [N] disagree (N <= {MAX_BOXES})")
            xywh, score = self.dataset(parts[0], "iuf"), self.dataset(parts[1], "iuf")
            labels = self._labels(parts[2])
            if self.dry:
                continue
            if not np.all(np.isfinite(xywh)) or np.any(xywh[:, 2:] < 0) or np.any(np.isinf(score)):
                raise self.fail(f"{bg.name}: box coordinates must be finite with w, h >= 0")
            xywh = self._inside_image(bg.name, xywh.astype(np.float64))
            out[source] = [Box(lab, float(x), float(y), float(w), float(h), None if np.isnan(sc) else float(sc))
                           for lab, (x, y, w, h), sc in zip(labels, xywh, score)]
        return out

    def _inside_image(self, where: str, xywh: np.ndarray) -> np.ndarray:
        """Boxes clipped to ``image_shape``; one that does not overlap the image is refused."""
        if self.image_shape is None or not len(xywh):
            return xywh
        h, w = self.image_shape
        x1, y1 = np.clip(xywh[:, 0], 0, w), np.clip(xywh[:, 1], 0, h)
        x2, y2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, w), np.clip(xywh[:, 1] + xywh[:, 3], 0, h)
        outside = ((x2 <= x1) | (y2 <= y1)) & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        if np.any(outside):
            i = int(np.argmax(outside))
            raise self.fail(f"{where}: box {i} ({', '.join(f'{v:g}' for v in xywh[i])}) lies outside "
                            f"the {w} x {h} image")
        clipped = np.stack([x1, y1, np.maximum(x2 - x1, 0), np.maximum(y2 - y1, 0)], axis=1)
        crosses = ((x1 != xywh[:, 0]) | (y1 != xywh[:, 1]) | (x2 != xywh[:, 0] + xywh[:, 2])
                   | (y2 != xywh[:, 1] + xywh[:, 3]))
        return np.where(crosses[:, None], clipped, xywh)  # boxes inside keep their exact values

    def _labels(self, ds: h5py.Dataset) -> list[str]:
        info = h5py.check_string_dtype(ds.dtype)
        if info is None or (info.length or 0) > MAX_LABEL:
            raise self.fail(f"{ds.name} must hold text labels (got {ds.dtype})")
        self.elements += ds.shape[0]
        if self.dry or ds.shape[0] == 0:
            return []
        try:
            labels = list(ds.asstr()[()])
        except UnicodeDecodeError:
            raise self.fail(f"{ds.name}: labels are not UTF-8 text") from None
        if any(len(v) > MAX_LABEL for v in labels):
            raise self.fail(f"{ds.name}: a label is longer than {MAX_LABEL} characters")
        return [str(v) for v in labels]


def _lzf_length(data: bytes, limit: int) -> int:
    """Decoded length of an LZF stream, counted without decoding; stops once past ``limit``
    (then returns a length > ``limit``); -1 for a stream that ends inside a token."""
    i, n, out = 0, len(data), 0
    while i < n:
        c = data[i]
        if c < 32:  # a literal run of c + 1 bytes
            out += c + 1
            i += c + 2
        elif c >= 224:  # a long back reference: 9 + next byte
            out += data[i + 1] + 9 if i + 1 < n else 0
            i += 3
        else:  # a short back reference
            out += (c >> 5) + 2
            i += 2
        if out > limit:
            return out
    return out if i == n else -1


def _one_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _read_v1_maps(r: _Reader) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Maps and attributes of a version 1 file, in the version 2 naming."""
    f = r.f
    groups = {g: r.child(f, g, h5py.Group, required=True) for g in _V1_GROUPS}
    maps: dict[str, dict[str, Any]] = {}
    for (group, ds), (ex, name) in _V1_MAPS.items():
        value = r.map_value(groups[group], ds)
        if value is not None:
            maps.setdefault(ex, {})[name] = value
    attrs: dict[str, dict[str, Any]] = {}
    c, d, s = groups["contrast"], groups["disease_mask"], groups["segmentation"]
    if "contrast" in maps:
        attrs["contrast"] = {"classes": r.attr_json(c, "classes", list, [])}
        if "paired_normal_id" in c.attrs:
            attrs["contrast"]["paired_normal_id"] = r.attr_str(c, "paired_normal_id", limit=4096)
    if "disease_mask" in maps and "source" in d.attrs:
        attrs["disease_mask"] = {"source": r.attr_str(d, "source", limit=4096)}
    if "segmentation" in maps:
        attrs["segmentation"] = {"classes": r.attr_json(s, "classes", list, [])}
    am = maps.get("attention_mining")
    if am is not None:
        for k in ("steps", "erased"):
            if not isinstance(am.setdefault(k, {}), dict):
                raise r.fail(f"/attention_mining/{k} must be a group of per-class maps")
        steps = r.attr_ints(groups["attention_mining"], "steps", None, None)
        if steps is not None:
            attrs["attention_mining"] = {"steps": steps}
    return maps, attrs


def _read_v2_maps(r: _Reader) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    maps: dict[str, dict[str, Any]] = {}
    attrs: dict[str, dict[str, Any]] = {}
    eg = r.child(r.f, "explainers", h5py.Group, required=True)
    for name in r.members(eg):
        g = r.child(eg, name, h5py.Group)
        maps[name] = {k: r.map_value(g, k) for k in r.members(g)}
        a = r.attr_json(g, "attrs", dict, {})
        if a:
            attrs[name] = a
    return maps, attrs


def resolve_source(stored: str, results_path: str | os.PathLike) -> str:
    """Where the study of a results file is: ``stored`` when that file exists, else a file of the
    same name next to the results file, else ``stored`` unchanged (the study is not found)."""
    if stored and os.path.isabs(stored) and os.path.isfile(stored):
        return stored
    name = PureWindowsPath(stored).name if "\\" in stored else Path(stored).name
    if name and name not in (".", ".."):
        beside = Path(results_path).absolute().parent / name
        if beside.is_file():
            return str(beside)
    return stored


def _open(path: str | os.PathLike) -> tuple[Path, h5py.File]:
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ResultsFileError("not a regular file", path=str(p))
        return p, h5py.File(p, "r")
    except ResultsFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, and whatever h5py raises on a non-HDF5 file
        raise ResultsFileError(f"not a readable results file ({_one_line(str(exc), 160)})", path=str(p)) from None


def _guarded(p: Path, fn: Any) -> Any:
    """``fn()`` with every failure turned into a one-line :class:`ResultsFileError`."""
    try:
        return fn()
    except ResultsFileError:
        raise
    except MemoryError:
        raise ResultsFileError("not enough memory to read this results file", path=str(p)) from None
    except Exception as exc:  # noqa: BLE001 - the contract is: typed errors only
        log.debug("malformed results file %s", p, exc_info=True)
        raise ResultsFileError(_one_line(f"malformed results file ({type(exc).__name__}: {exc})"),
                               path=str(p)) from None


def _version(r: _Reader) -> int:
    version = r.attr_ints(r.f, "format_version", None, -1)
    if version < 1 or version > FORMAT_VERSION:
        raise r.fail(f"results format version {version} is not supported (this cxrviewer reads 1..{FORMAT_VERSION})")
    return version


def _read_data(r: _Reader, version: int) -> tuple[Any, dict, dict, dict[str, list[Box]]]:
    probabilities = r.probabilities()
    maps, attrs = _read_v1_maps(r) if version == 1 else _read_v2_maps(r)
    return probabilities, maps, attrs, r.boxes(r.child(r.f, "boxes", h5py.Group, required=True))


def _read(r: _Reader) -> Results:
    version = r.version = _version(r)
    groups = _V1_GROUPS if version == 1 else GROUPS
    missing = [g for g in groups if g not in r.f]
    if missing:
        raise r.fail(f"results file lacks group(s) {missing}")
    root = r.root()
    r.dry = True  # first every declaration against the budget, then the data
    _read_data(r, version)
    r.dry, r.elements, r.nbytes = False, 0, 0
    probabilities, maps, attrs, boxes = _read_data(r, version)
    if version == 1:
        boxes = {_V1_BOXES.get(k, k): v for k, v in boxes.items()}
    root["source_path"] = resolve_source(root["source_path"], r.path)
    return Results(**root, probabilities=probabilities, maps=maps, attrs=attrs, boxes=boxes,
                   format_version=version, native=r.log if len(r.log) else None)


def read_results(path: str | os.PathLike) -> Results:
    """Read a results file (format version 1, 2 or 3) back into a :class:`Results`; maps stored
    on their native grid or quantised (version 3) come back at ``map_shape`` as float32.

    Raises :class:`ResultsFileError` only (a one-line message naming the file), whatever the file
    holds: every dataset's declared shape, type, chunking and compression are checked against the
    limits of this module and the file's own ``image_shape``/``map_shape``/classes before it is
    read; soft, external and virtual links are refused; JSON attributes are size-checked and
    type-checked; probabilities with NaN/Inf and non-finite boxes are refused (the app never
    writes them). ``source_path`` is resolved by :func:`resolve_source`.

    The features kept for on-demand attention mining are not stored, so
    ``Pipeline.compute_class`` needs a fresh run for classes not in the file.
    """
    p, f = _open(path)
    with f:
        return _guarded(p, lambda: _read(_Reader(f, p)))


def _summary(r: _Reader) -> dict[str, Any]:
    r.version = _version(r)
    f = r.f
    classes = r.attr_json(f, "classes", list, [])
    if len(classes) > MAX_CLASSES or not all(isinstance(c, str) for c in classes):
        raise r.fail(f"classes must be at most {MAX_CLASSES} names")
    r.n_classes = len(classes)
    default = r.attr_str(f, "default_box_method", None, limit=256)
    r.dry = True
    r.probabilities()
    r.dry = False
    probs = r.probabilities()
    return {"source_path": resolve_source(r.attr_str(f, "source_path", "", limit=4096), r.path),
            "study_id": _clean(r.attr_str(f, "study_id", "", limit=4096)),
            "pixel_sha256": r.attr_str(f, "pixel_sha256", "", limit=128), "classes": classes,
            "default_box_method": default,
            "probabilities": None if probs is None else np.asarray(probs, np.float32)}


def results_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Study path (resolved by :func:`resolve_source`), id, pixel hash, classes, probabilities and
    default box method (None when the file does not say) of a results file (no maps read).
    Raises :class:`ResultsFileError` only, with the checks of :func:`read_results`."""
    p, f = _open(path)
    with f:
        return _guarded(p, lambda: _summary(_Reader(f, p)))
