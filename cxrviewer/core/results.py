"""What the pipeline computed for one study: maps by explainer name, boxes, timings, provenance.

``maps[explainer][map]`` holds the arrays each explainer declares
(:class:`~cxrviewer.core.explain.registry.MapSpec`): per-class maps ``[C, h, w]`` at
``map_shape`` in ORIGINAL image coordinates, step maps as ``{class name: [T, h, w]}``, and
whatever else the method declares (an aligned image, an affine). ``attrs[explainer]`` holds its
JSON-able attributes (e.g. its own class list, the disease-mask source). Boxes are in original
pixels, keyed by the explainer that proposed them. ``state`` is runtime-only (kept features for
on-demand maps) and never written to a file.

Maps are computed on a small native grid and drawn into the original frame by the explainer
context's ``Mapper``; it records each native input and its :class:`MapRecipe` in a
:class:`NativeLog` (``Results.native``, runtime only), so the writer can store the native grid
and the reader redraw it with :func:`remap` (numpy only: the GUI reads results without torch).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrviewer.core.geometry import Box

__all__ = ["RESULTS_FORMAT_VERSION", "MapRecipe", "NativeLog", "Results", "remap", "slice_digest"]

RESULTS_FORMAT_VERSION = 3
MODES = ("bilinear", "nearest")


@dataclass
class Results:
    """Everything the pipeline computed for one study (see the module docstring)."""

    study_id: str
    source_path: str
    pixel_sha256: str
    image_shape: tuple[int, int]
    map_shape: tuple[int, int]
    classes: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # explainer -> boxes (original px)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> manifest summary
    notices: list[str] = field(default_factory=list)
    format_version: int = RESULTS_FORMAT_VERSION
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    native: "NativeLog | None" = field(default=None, repr=False, compare=False)  # see the module docstring

    def get(self, explainer: str, name: str) -> Any | None:
        """The array ``name`` of ``explainer`` (None when that method did not run or has no such map)."""
        return self.maps.get(explainer, {}).get(name)

    def attr(self, explainer: str, name: str, default: Any = None) -> Any:
        """An attribute of ``explainer``'s output (e.g. ``attr("disease_mask", "source")``)."""
        return self.attrs.get(explainer, {}).get(name, default)

    @property
    def map_scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per map cell."""
        return (self.image_shape[0] / self.map_shape[0], self.image_shape[1] / self.map_shape[1])

    def class_index(self, name: str) -> int:
        return self.classes.index(name)

    def top_classes(self, k: int = 1) -> list[int]:
        """Indices of the ``k`` most probable classes (empty without a classifier)."""
        if self.probabilities is None:
            return []
        return [int(i) for i in np.argsort(-self.probabilities, kind="stable")[:k]]

    def boxes_for(self, label: str, source: str | None = None) -> list[Box]:
        srcs = [source] if source else list(self.boxes)
        return [b for s in srcs for b in self.boxes.get(s, []) if b.label == label]

    def add_class_maps(self, name: str, maps: dict[str, dict[str, np.ndarray]]) -> None:
        """Store on-demand step maps of class ``name`` (``{explainer: {map: [T, h, w]}}``)."""
        for explainer, m in maps.items():
            for key, arr in m.items():
                self.maps.setdefault(explainer, {}).setdefault(key, {})[name] = arr

    def snapshot(self) -> "Results":
        """A copy another thread may keep: containers copied, arrays and the :class:`NativeLog`
        shared (so the copy is still written compactly), runtime state dropped."""
        return Results(
            study_id=self.study_id, source_path=self.source_path, pixel_sha256=self.pixel_sha256,
            image_shape=self.image_shape, map_shape=self.map_shape, classes=self.classes,
            probabilities=self.probabilities,
            maps={e: {k: dict(v) if isinstance(v, dict) else v for k, v in m.items()} for e, m in self.maps.items()},
            attrs={e: dict(a) for e, a in self.attrs.items()}, boxes={k: list(v) for k, v in self.boxes.items()},
            timings=dict(self.timings), device=self.device, models=dict(self.models), notices=list(self.notices),
            format_version=self.format_version, native=self.native)


@dataclass(frozen=True)
class MapRecipe:
    """How a native map ``[..., h, w]`` is drawn into the original frame at ``map_shape``: resized
    into ``box`` (y0, y1, x0, x1 in pixels of a ``frame_shape`` frame; None: the whole frame),
    then warped by ``theta_inv`` (2 x 3, ``grid_sample`` convention; None: no warp); ``mode`` is
    ``bilinear`` or ``nearest``. Outside the box / warp a map takes its own minimum."""

    map_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    box: tuple[int, int, int, int] | None
    theta_inv: tuple[float, ...] | None
    mode: str = "bilinear"

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON values (see :meth:`from_json`)."""
        return {"map_shape": list(self.map_shape), "frame_shape": list(self.frame_shape),
                "box": None if self.box is None else list(self.box),
                "theta_inv": None if self.theta_inv is None else list(self.theta_inv), "mode": self.mode}

    @classmethod
    def from_json(cls, d: Any, max_side: int, max_frame: int) -> "MapRecipe":
        """A recipe from :meth:`to_json` output, checked; ValueError on anything malformed."""
        if not isinstance(d, dict):
            raise ValueError("recipe is not an object")
        ms, fs = _ints(d.get("map_shape"), 2, 1, max_side), _ints(d.get("frame_shape"), 2, 1, max_frame)
        box = d.get("box")
        if box is not None:
            box = _ints(box, 4, 0, max_frame)
            if not (box[0] < box[1] <= fs[0] and box[2] < box[3] <= fs[1]):
                raise ValueError(f"box {box} does not lie in the frame {fs}")
        theta = d.get("theta_inv")
        if theta is not None:
            if not (isinstance(theta, list) and len(theta) == 6 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e6
                    for v in theta)):
                raise ValueError("theta_inv must be 6 finite numbers")
            theta = tuple(float(v) for v in theta)
        if d.get("mode") not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        return cls(ms, fs, box, theta, str(d["mode"]))  # type: ignore[arg-type]


def _ints(v: Any, n: int, lo: int, hi: int) -> tuple[int, ...]:
    if not (isinstance(v, list) and len(v) == n and all(
            isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v)):
        raise ValueError(f"expected {n} integers in {lo}..{hi}, got {str(v)[:60]}")
    return tuple(v)


def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """``[n_out, n_in]`` interpolation weights of torch's ``interpolate`` (align_corners=False,
    upsampling or same size; shrinking with bilinear is anti-aliased there and not supported)."""
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    if n_in == n_out:
        m[rows, rows] = 1.0
        return m
    if mode == "nearest":
        idx = rows >> 1 if n_out == 2 * n_in else np.minimum(
            np.floor(rows.astype(np.float32) * np.float32(n_in / n_out)).astype(np.int64), n_in - 1)
        m[rows, idx] = 1.0
        return m
    if n_in > n_out:
        raise ValueError("shrinking a map is not redrawn from its native grid")
    src = np.maximum((rows + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def _warp_table(shape: tuple[int, int], theta: tuple[float, ...], mode: str,
                rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat source indices and weights ``[k, n]`` of torch's ``affine_grid`` + ``grid_sample``
    (align_corners=False, zero padding) resampling a ``shape`` image onto itself, for the output
    rows ``rows`` (start, stop; default all)."""
    h, w = shape
    r0, r1 = rows or (0, h)
    t = np.asarray(theta, np.float32).reshape(2, 3)
    xs = ((2 * np.arange(w, dtype=np.float32) + 1) / w - 1).astype(np.float32)
    ys = ((2 * np.arange(r0, r1, dtype=np.float32) + 1) / h - 1).astype(np.float32)
    gx = (t[0, 0] * xs[None, :] + t[0, 1] * ys[:, None] + t[0, 2]).ravel()
    gy = (t[1, 0] * xs[None, :] + t[1, 1] * ys[:, None] + t[1, 2]).ravel()
    ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
    if mode == "nearest":
        corners = [(np.rint(iy), np.rint(ix), np.ones_like(ix))]
    else:
        x0, y0 = np.floor(ix), np.floor(iy)
        fx, fy = ix - x0, iy - y0
        corners = [(y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                   (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)]
    idx, wts = [], []
    for cy, cx, wt in corners:
        ok = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
        idx.append(np.where(ok, cy * w + cx, 0).astype(np.int64))
        wts.append(np.where(ok, wt, 0).astype(np.float32))
    return np.stack(idx), np.stack(wts)


def _warp_matrix(shape: tuple[int, int], theta: tuple[float, ...], mode: str,
                 rows: tuple[int, int] | None = None) -> Any:
    """:func:`_warp_table` as a sparse ``[n, H*W]`` matrix (CSR)."""
    from scipy import sparse

    idx, wts = _warp_table(shape, theta, mode, rows)
    n = idx.shape[1]
    m = sparse.csr_matrix((wts.T.ravel(), (np.repeat(np.arange(n), len(idx)), idx.T.ravel())),
                          shape=(n, shape[0] * shape[1]), dtype=np.float32)
    m.eliminate_zeros()
    return m


def _warp(out: np.ndarray, recipe: "MapRecipe") -> np.ndarray:
    """``out [N, H, W]`` resampled by the recipe's inverse affine (a sparse matrix, cached for
    maps of at most 1 Mi pixels, built in blocks of rows for larger ones)."""
    H, W = recipe.map_shape
    theta, mode = recipe.theta_inv, recipe.mode
    flat = out.reshape(out.shape[0], -1)
    res = np.empty_like(flat)
    if H * W <= 2**20:
        m = _cached(("w", recipe.map_shape, theta, mode), lambda: _warp_matrix((H, W), theta, mode))
        for i in range(len(flat)):  # one sparse mat-vec per slice: no transposes of full maps
            res[i] = m @ flat[i]
        return res.reshape(out.shape)
    step = max(1, 2**18 // W)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        m = _warp_matrix((H, W), theta, mode, (r0, r1))  # type: ignore[arg-type]
        for i in range(len(flat)):
            res[i, r0 * W:r1 * W] = m @ flat[i]
    return res.reshape(out.shape)


_TABLES: "OrderedDict[Any, Any]" = OrderedDict()
_TABLES_LOCK = threading.Lock()


def _cached(key: Any, make: Any) -> Any:
    """A small LRU of resize matrices and warp tables (recipes repeat across maps and studies)."""
    with _TABLES_LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
    value = make()
    with _TABLES_LOCK:
        _TABLES[key] = value
        while len(_TABLES) > 16:
            _TABLES.popitem(last=False)
    return value


def remap(native: np.ndarray, recipe: MapRecipe) -> np.ndarray:
    """Draw native maps ``[..., h, w]`` into the original frame: ``[..., *recipe.map_shape]``
    float32, as the explainer context's ``Mapper`` does with torch (numpy only)."""
    a = np.asarray(native, np.float32)
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    m = a.reshape(-1, h, w)
    lo = m.min(axis=(-2, -1), keepdims=True) if m.size else np.zeros((m.shape[0], 1, 1), np.float32)
    H, W = recipe.map_shape
    if recipe.box is None:
        fy0, fy1, fx0, fx1 = 0, H, 0, W
    else:
        y0, y1, x0, x1 = recipe.box
        sy, sx = H / recipe.frame_shape[0], W / recipe.frame_shape[1]
        fy0, fy1 = int(round(y0 * sy)), max(int(round(y1 * sy)), int(round(y0 * sy)) + 1)
        fx0, fx1 = int(round(x0 * sx)), max(int(round(x1 * sx)), int(round(x0 * sx)) + 1)
        if fy1 > H or fx1 > W:
            raise ValueError(f"box {recipe.box} falls outside the {H} x {W} map")
    ry = _cached(("r", h, fy1 - fy0, recipe.mode), lambda: _resize_matrix(h, fy1 - fy0, recipe.mode))
    rx = _cached(("r", w, fx1 - fx0, recipe.mode), lambda: _resize_matrix(w, fx1 - fx0, recipe.mode))
    out = np.zeros((m.shape[0], H, W), np.float32)
    out[:, fy0:fy1, fx0:fx1] = ry @ (m - lo) @ rx.T
    if recipe.theta_inv is not None:
        out = _warp(out, recipe)
    return (out + lo).reshape(*lead, H, W)


def slice_digest(a: np.ndarray) -> tuple[int, int]:
    """An exact digest of a 2-D map's float32 values: the sum and the XOR of their bit patterns.
    A map with any one value changed has another digest (and, beside the log's sparse
    fingerprint, so has any edit short of a deliberate one); 0.1 ms per 512 x 512 map, so the
    ``Mapper`` can afford it on every slice it draws."""
    v = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return int(v.sum(dtype=np.uint64)), int(np.bitwise_xor.reduce(v, axis=None))


def _key(a: np.ndarray) -> tuple[Any, ...]:
    """A cheap fingerprint of a 2-D map: its shape and a sparse sample of its values."""
    h, w = a.shape
    return (h, w, np.ascontiguousarray(a[:: max(1, h // 12), :: max(1, w // 12)], np.float32).tobytes())


class NativeLog:
    """Runtime side table: which native grid (and recipe) each map slice the ``Mapper`` returned
    was drawn from. :meth:`find` gives candidates by fingerprint, each with the digest of the exact
    slice it drew (:func:`slice_digest`); the writer checks that the map it stores is still that
    slice and that the numpy redraw matches the recipe."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], list[tuple[np.ndarray, MapRecipe, tuple[int, int]]]] = {}
        self._lock = threading.Lock()

    def add(self, native: np.ndarray, out: np.ndarray, recipe: MapRecipe) -> None:
        """Record ``out [N, H, W]`` as drawn from ``native [N, h, w]`` by ``recipe``."""
        with self._lock:
            for n, o in zip(native, out):
                cands = self._by_key.setdefault(_key(o), [])
                if len(cands) < 8:
                    cands.append((np.array(n, np.float32), recipe, slice_digest(o)))

    def find(self, slice2d: np.ndarray) -> list[tuple[np.ndarray, MapRecipe, tuple[int, int]]]:
        """The recorded (native, recipe, digest of the drawn slice) whose output fingerprint matches
        ``slice2d``."""
        with self._lock:
            return list(self._by_key.get(_key(slice2d), ()))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())
