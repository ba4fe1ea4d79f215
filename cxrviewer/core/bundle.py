"""Model bundles: weights + a JSON manifest + optional arrays, loaded safely.

A bundle is a folder ``NAME.cxrbundle/`` holding

``manifest.json``
    what the network is (registry architecture name + kwargs, family, class
    names), how to feed it (input size, normalisation, crop, canonical chest),
    how it was trained (provenance) and the SHA-256 and size of every other file.
``weights.pt``
    a plain ``state_dict`` written by :func:`torch.save`; read with
    ``torch.load(weights_only=True)``, so a pickle payload is refused instead of
    run.
``extras.npz`` (optional)
    numeric/string arrays read with ``allow_pickle=False``: the CIA normal bank
    (``normal_bank_images`` uint8 [N,S,S], ``normal_bank_codes`` float32
    [N,256], ``normal_bank_ids`` str [N]) and disease masks (``disease_masks``
    float32 [C,h,w], disease-masks Eq. 3).

A folder (not a single archive) keeps each part inspectable with ordinary
tools, lets the weights be memory-mapped by torch and lets PyInstaller ship
bundles as data files. See ``resources/models/README.md``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import mkdtemp_beside
from .checksum import sha256_file
from .jsonsafe import loads_strict
from .labelsets import BUILTIN as BUILTIN_SETS
from .labelsets import NIH14, LabelSet, label_set_from_json
from .errors import BundleError, CxrError, LabelSetError, ModelError
from .families import FAMILIES  # noqa: F401  (the bundle families, re-exported)
from .preprocess import LEGACY_NORMALISATION_KINDS, NORMALISATIONS, Preprocess, crop_box_pixels

log = logging.getLogger(__name__)

#: Manifest format this code writes; bundles with a larger number are refused.
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".cxrbundle"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
EXTRAS = "extras.npz"

#: Normalisation kinds understood by :mod:`cxrviewer.core.preprocess`.
NORMALISATION_KINDS = tuple(NORMALISATIONS)

# ---- limits: what a bundle may declare, checked before anything is read, built or allocated ----
#: ``manifest.json`` larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 1 << 20
#: Most classes a network may declare (``num_classes`` and ``classes``).
MAX_CLASSES = 1000
#: Network input side (pixels), each of height and width.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 4096
#: Integer ``arch_kwargs`` / ``inference`` values lie in ``[0, MAX_INT_ARG]`` unless listed in
#: :data:`INT_ARG_RANGES` (widths, sizes, channels).
MAX_INT_ARG = 4096
INT_ARG_RANGES: dict[str, tuple[int, int]] = {"num_classes": (1, MAX_CLASSES), "in_channels": (1, 16),
                                              "depth": (1, 8)}
#: Most entries of ``arch_kwargs`` (and items of a list value), and longest string value.
MAX_ARGS, MAX_STRING = 64, 256
#: Most parameters + buffers (elements) of a network a manifest may describe (counted on the
#: ``meta`` device, nothing allocated): 100 M = 400 MB of float32, twice the largest shipped net.
MAX_PARAMETERS = 100_000_000
#: ``weights.pt`` larger than this is refused before it is hashed or read.
MAX_WEIGHTS_BYTES = 4 * MAX_PARAMETERS + (16 << 20)
#: ``extras.npz``: total uncompressed bytes its members declare (zip directory and .npy headers),
#: checked before any array is inflated; most members.
MAX_EXTRAS_BYTES = 256 << 20
MAX_EXTRAS_MEMBERS = 64


def _current_spelling(norm: Any) -> Any:
    """A manifest ``normalisation`` with an older kind spelling (``zero_1``) renamed; else as given."""
    kind = norm.get("kind") if isinstance(norm, Mapping) else None
    if isinstance(kind, str) and kind in LEGACY_NORMALISATION_KINDS:
        return {**norm, "kind": LEGACY_NORMALISATION_KINDS[kind]}
    return norm


def _registry():
    """The model registry (imported lazily so bundle.py loads without it)."""
    from . import models  # noqa: F401  (importing the package registers every family)
    from .models import create_model, get_spec

    return create_model, get_spec


def _cxr_version() -> str:
    from .. import __version__

    return __version__


def _git_commit() -> str | None:
    """The checkout's HEAD commit, or ``None`` (frozen app, no git, no commits)."""
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = head.parent / ref[5:]
            return ref_path.read_text().strip() if ref_path.is_file() else None
        return ref or None
    except OSError:
        return None


# ---------------------------------------------------------------------------
#: The keys of ``manifest.json``, in the order they are written (:meth:`Manifest.to_dict`).
_MANIFEST_KEYS: tuple[str, ...] = (
    "format_version", "name", "description", "architecture", "arch_kwargs", "family", "role", "classes",
    "label_set", "input_size", "normalisation", "crop", "canonical_chest", "provenance", "files", "extras_info",
    "inference", "model_card", "cxrviewer_version", "created",
)
#: The keys of :meth:`Manifest.summary`, in order.
_SUMMARY_KEYS: tuple[str, ...] = (
    "name", "architecture", "family", "role", "input_size", "weights_sha256", "research_demo", "trained",
    "cxrviewer_version",
)


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a bundle (see module docstring)."""

    architecture: str
    family: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    #: the label set ``classes`` come from: a built-in name (cxrviewer/core/labelsets.py), a set's
    #: JSON object, or None: the family's default (NIH-14 for classifiers and CIA)
    label_set: str | dict[str, Any] | None = None
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "minus1_1"})
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    crop: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    canonical_chest: dict[str, Any] | None = None  # {"file": name, "sha256": hex}
    name: str = ""
    description: str = ""
    role: str | None = None  # optional pipeline role hint, e.g. "dm"
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, bytes}
    extras_info: dict[str, Any] = field(default_factory=dict)  # e.g. {"normal_bank": {"synthetic": true}}
    inference: dict[str, Any] = field(default_factory=dict)  # e.g. CIA {"upsample_to": 128}
    model_card: dict[str, Any] | None = None  # its evaluation (cxrviewer/core/model_card.py)
    format_version: int = FORMAT_VERSION
    cxrviewer_version: str = ""
    created: str = ""

    @property
    def weights_sha256(self) -> str | None:
        return self.files.get(WEIGHTS, {}).get("sha256")

    @property
    def research_demo(self) -> bool:
        return bool(self.provenance.get("research_demo", False))

    @property
    def trained(self) -> bool:
        """``False`` for an untrained (random-weight) bundle; a manifest that does not say is trained."""
        return bool(self.provenance.get("trained", True))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as ``manifest.json`` (no ``model_card`` key when it has none)."""
        d = self._pick(_MANIFEST_KEYS)
        for optional in ("model_card", "label_set"):
            if d.get(optional) is None:
                d.pop(optional, None)
        return d

    @property
    def labels(self) -> LabelSet | None:
        """The :class:`~cxrviewer.core.labelsets.LabelSet` of ``classes`` (None: any names)."""
        return _label_set(self.family, self.label_set)

    def summary(self) -> dict[str, Any]:
        """Short JSON-able description for results files and the GUI."""
        return self._pick(_SUMMARY_KEYS)

    def _pick(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """These fields and properties, in this order; tuples become JSON lists."""
        values = {key: getattr(self, key) for key in keys}
        return {key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, path: str | None = None) -> "Manifest":
        """Validate ``d`` against the manifest schema (types, ranges, label set) and build it.

        Raises :class:`BundleError` naming the first problem; nothing is built from an invalid dict.
        """
        if not isinstance(d, Mapping):
            raise BundleError("manifest.json is not a JSON object", path=path)
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError("manifest.json has no integer 'format_version'", path=path)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this cxrviewer reads "
                f"({FORMAT_VERSION}); update cxrviewer", path=path)
        for key in ("architecture", "family", "classes", "input_size"):
            if key not in d:
                raise BundleError(f"manifest.json lacks '{key}'", path=path)
        for key in ("architecture", "family"):
            if not isinstance(d[key], str) or not 0 < len(d[key]) <= MAX_STRING:
                raise BundleError(f"manifest '{key}' must be a non-empty string, got {_short(d[key])}", path=path)
        norm = _current_spelling(d.get("normalisation") or {"kind": "minus1_1"})
        kind = norm.get("kind") if isinstance(norm, Mapping) else None
        if not isinstance(kind, str) or kind not in NORMALISATION_KINDS:
            raise BundleError(f"manifest 'normalisation' kind must be one of {NORMALISATION_KINDS}, "
                              f"got {_short(norm)}", path=path)
        m = cls(
            architecture=d["architecture"],
            family=d["family"],
            classes=_valid_classes(d["classes"], d["family"], path, d.get("label_set")),
            label_set=_valid_label_set_field(d.get("label_set"), path),
            input_size=_valid_input_size(d["input_size"], path),
            normalisation=dict(norm),
            arch_kwargs=_valid_args(d.get("arch_kwargs"), "arch_kwargs", path),
            crop=_valid_crop(d.get("crop"), path),
            canonical_chest=_valid_optional_mapping(d, "canonical_chest", path),
            name=_valid_text(d, "name", path),
            description=_valid_text(d, "description", path),
            role=_valid_text(d, "role", path) or None,
            provenance=_valid_optional_mapping(d, "provenance", path) or {},
            files=_valid_files(d.get("files"), path),
            extras_info=_valid_optional_mapping(d, "extras_info", path) or {},
            inference=_valid_args(d.get("inference"), "inference", path),
            model_card=dict(d["model_card"]) if isinstance(d.get("model_card"), Mapping) else None,
            format_version=version,
            cxrviewer_version=_valid_text(d, "cxrviewer_version", path),
            created=_valid_text(d, "created", path),
        )
        try:  # the preprocessing it describes must be buildable (mean/std, stretch)
            Preprocess.from_manifest(m)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise BundleError(f"manifest preprocessing is unusable: {_first_line(exc)}", path=path) from exc
        return m


# ---- manifest schema ---------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (for one-line messages)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _valid_input_size(size: Any, path: str | None) -> tuple[int, int]:
    """``N`` or ``[H, W]``, each an integer in ``[MIN_INPUT_SIDE, MAX_INPUT_SIDE]``."""
    if _is_int(size):
        size = [size, size]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(_is_int(s) and MIN_INPUT_SIDE <= s <= MAX_INPUT_SIDE for s in size)):
        raise BundleError(f"manifest 'input_size' must be N or [H, W] with each side an integer in "
                          f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}, got {_short(size)}", path=path)
    return int(size[0]), int(size[1])


def _valid_label_set_field(value: Any, path: str | None) -> str | dict[str, Any] | None:
    """``label_set``: absent, a built-in set's name or a set's JSON object (a usable one)."""
    if value is None:
        return None
    if not isinstance(value, (str, dict)):
        raise BundleError(f"manifest 'label_set' must be a label-set name or object, got {_short(value)}", path=path)
    try:
        label_set_from_json(value)
    except LabelSetError as exc:
        raise BundleError(f"manifest 'label_set': {exc}", path=path) from None
    return value if isinstance(value, str) else dict(value)


def _label_set(family: str, declared: Any = None) -> LabelSet | None:
    """The label set the classes of a bundle must come from: the manifest's ``label_set``, else
    the family's (NIH-14 for classifiers and CIA, the lung/heart structures for segmentation);
    None: any names."""
    if declared is not None:
        try:
            return label_set_from_json(declared)
        except LabelSetError:
            return None  # (reported by _valid_label_set_field)
    if family in ("classifier", "cia"):
        return NIH14
    if family == "segmentation":
        from .labelsets import SEGMENTATION_CLASSES  # (not from .models: that imports torchvision)

        return LabelSet("lung/heart segmentation", tuple(SEGMENTATION_CLASSES))
    return None


def _valid_classes(classes: Any, family: str, path: str | None, declared: Any = None) -> tuple[str, ...]:
    """A list of unique names from the bundle's label set (spellings and synonyms become its labels)."""
    if (not isinstance(classes, list) or len(classes) > MAX_CLASSES
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_STRING for c in classes)):
        raise BundleError(f"manifest 'classes' must be a list of at most {MAX_CLASSES} non-empty "
                          f"names, got {_short(classes)}", path=path)
    names = [c.strip() for c in classes]
    label_set = _label_set(family, declared)
    if label_set is not None:
        unknown = list(dict.fromkeys(c for c in names if c not in label_set))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise BundleError(f"manifest 'classes' holds names not in the {label_set.display_name} label set: "
                              f"{', '.join(repr(c) for c in unknown[:5])}{more}; known: "
                              f"{', '.join(label_set.labels[:20])}; name another set in 'label_set'", path=path)
        names = [label_set.canonical(c) or c for c in names]
    dups = sorted({c for c in names if names.count(c) > 1}) if len(set(names)) != len(names) else []
    if dups:
        raise BundleError(f"manifest 'classes' names {', '.join(map(repr, dups[:5]))} more than once", path=path)
    return tuple(names)


def _valid_scalar(key: str, v: Any, where: str, path: str | None) -> None:
    """One ``arch_kwargs``/``inference`` value: null, bool, short string, finite float or ranged int."""
    if key in INT_ARG_RANGES and v is not None and not _is_int(v):
        raise BundleError(f"manifest '{where}.{key}' must be an integer, got {_short(v)}", path=path)
    if v is None or isinstance(v, bool) or (isinstance(v, float) and math.isfinite(v) and abs(v) <= MAX_INT_ARG):
        return
    if isinstance(v, str) and len(v) <= MAX_STRING:
        return
    if _is_int(v):
        lo, hi = INT_ARG_RANGES.get(key, (0, MAX_INT_ARG))
        if lo <= v <= hi:
            return
        raise BundleError(f"manifest '{where}.{key}' = {_short(v)} is outside {lo}..{hi}", path=path)
    if isinstance(v, float):
        raise BundleError(f"manifest '{where}.{key}' = {_short(v)} is not a finite number within "
                          f"+-{MAX_INT_ARG}", path=path)
    raise BundleError(f"manifest '{where}.{key}' must be a JSON number, string, boolean or null "
                      f"(or a short list of them), got {_short(v)}", path=path)


def _valid_args(args: Any, where: str, path: str | None) -> dict[str, Any]:
    """``arch_kwargs``/``inference``: an object of at most :data:`MAX_ARGS` scalars or short scalar lists."""
    if args is None:
        return {}
    if not isinstance(args, Mapping) or len(args) > MAX_ARGS:
        raise BundleError(f"manifest '{where}' must be a JSON object of at most {MAX_ARGS} entries, "
                          f"got {_short(args)}", path=path)
    for key, v in args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise BundleError(f"manifest '{where}' key {_short(key)} is not a name", path=path)
        if isinstance(v, list):
            if len(v) > MAX_ARGS:
                raise BundleError(f"manifest '{where}.{key}' lists more than {MAX_ARGS} values", path=path)
            for item in v:
                _valid_scalar(key, item, where, path)
        else:
            _valid_scalar(key, v, where, path)
    return dict(args)


def _valid_crop(crop: Any, path: str | None) -> dict[str, Any]:
    """``{"kind": "none"}`` or ``{"kind": "box", "box": [x0, y0, x1, y1]}`` fractions, x0 < x1, y0 < y1."""
    crop = crop or {"kind": "none"}
    if not isinstance(crop, Mapping) or crop.get("kind") not in ("none", "box"):
        raise BundleError(f"manifest 'crop' must be {{'kind': 'none'}} or {{'kind': 'box', ...}}, "
                          f"got {_short(crop)}", path=path)
    if crop["kind"] == "box":
        box = crop.get("box")
        ok = (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and 0 <= v <= 1 for v in box)
              and box[0] < box[2] and box[1] < box[3])
        if not ok:
            raise BundleError(f"manifest crop 'box' must be [x0, y0, x1, y1] fractions in 0..1 with "
                              f"x0 < x1 and y0 < y1, got {_short(box)}", path=path)
        try:
            crop_box_pixels(crop, (MAX_INPUT_SIDE, MAX_INPUT_SIDE))
        except ValueError as exc:
            raise BundleError(f"manifest crop is unusable: {_first_line(exc)}", path=path) from exc
    return dict(crop)


def _valid_optional_mapping(d: Mapping[str, Any], key: str, path: str | None) -> dict[str, Any] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise BundleError(f"manifest '{key}' must be a JSON object or null, got {_short(v)}", path=path)
    return dict(v)


def _valid_text(d: Mapping[str, Any], key: str, path: str | None) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BundleError(f"manifest '{key}' must be a string, got {_short(v)}", path=path)
    return v


def _valid_files(files: Any, path: str | None) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256": hex, "bytes": n}}``."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise BundleError(f"manifest 'files' must be a JSON object, got {_short(files)}", path=path)
    for name, info in files.items():
        ok = (isinstance(info, Mapping) and isinstance(info.get("sha256", ""), str)
              and (info.get("bytes") is None or (_is_int(info["bytes"]) and info["bytes"] >= 0)))
        if not ok:
            raise BundleError(f"manifest 'files' entry {_short(name)} must be {{'sha256': hex, 'bytes': n}}, "
                              f"got {_short(info)}", path=path)
    return {str(k): dict(v) for k, v in files.items()}


@dataclass
class LoadedBundle:
    """A bundle ready to run: the network (eval mode, no grad), manifest and arrays."""

    model: torch.nn.Module
    manifest: Manifest
    extras: dict[str, np.ndarray]
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name or self.path.stem

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes


# ---------------------------------------------------------------------------
def _bundle_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.name == MANIFEST:
        p = p.parent
    return p


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and validate ``manifest.json`` of the bundle at ``path`` (no weights read).

    The file must be at most :data:`MAX_MANIFEST_BYTES`, strict JSON (no ``NaN``/``Infinity``)
    and pass the schema of :meth:`Manifest.from_dict`; anything else is a :class:`BundleError`.
    """
    d = _bundle_dir(path)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise BundleError("not a model bundle folder", path=str(d))
    if not mpath.is_file():
        raise BundleError("bundle has no manifest.json", path=str(d))
    try:
        with open(mpath, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"manifest.json cannot be read ({exc.strerror or exc})", path=str(d)) from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is larger than {MAX_MANIFEST_BYTES // 1024} KiB; refused unread",
                          path=str(d))
    try:
        raw = loads_strict(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"manifest.json is not valid JSON ({_first_line(exc)})", path=str(d)) from exc
    except RecursionError as exc:
        raise BundleError("manifest.json is not valid JSON (nested too deeply)", path=str(d)) from exc
    return Manifest.from_dict(raw, path=str(d))


def find_bundles(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Bundle folders (``*.cxrbundle`` with a manifest) directly inside ``dirs``, sorted."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if (d / MANIFEST).is_file():
            found.append(d)
            continue
        if not d.is_dir():
            continue
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise BundleError(f"cannot list the models folder ({exc.strerror or exc})", path=str(d)) from exc
        found.extend(p for p in entries
                     if p.is_dir() and p.name.endswith(BUNDLE_SUFFIX) and (p / MANIFEST).is_file())
    return found


def _model_num_outputs(model: torch.nn.Module) -> int | None:
    """Number of output classes a network produces, if it can be told cheaply."""
    cam_weights = getattr(model, "cam_weights", None)
    if callable(cam_weights):
        try:
            w = cam_weights()[0]
            return int(w.shape[0])
        except Exception:  # noqa: BLE001 - a model without a linear head
            pass
    kw = getattr(model, "arch_kwargs", None) or {}
    n = kw.get("num_classes")
    return int(n) if isinstance(n, int) else None


def _check_classes(model: torch.nn.Module, manifest: Manifest, path: str) -> None:
    if manifest.family in ("classifier", "cia", "segmentation"):
        n = _model_num_outputs(model)
        if n is not None and n != len(manifest.classes):
            raise BundleError(
                f"manifest lists {len(manifest.classes)} classes but the network "
                f"'{manifest.architecture}' produces {n} outputs", path=path)


def _check_state_dict(model: torch.nn.Module, state: Mapping[str, Any], path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BundleError(f"weights lack tensor '{missing[0]}'{more} expected by "
                          f"architecture '{getattr(model, 'arch', '?')}'", path=path)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise BundleError(f"weights hold unexpected tensor '{unexpected[0]}'{more} not in "
                          f"architecture '{getattr(model, 'arch', '?')}'", path=path)
    for k, t in expected.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise BundleError(f"weights entry '{k}' is not a tensor", path=path)
        if tuple(v.shape) != tuple(t.shape):
            raise BundleError(f"tensor '{k}' has shape {tuple(v.shape)} in the weights but the "
                              f"architecture expects {tuple(t.shape)}", path=path)


#: Largest file of each kind a bundle may hold (checked before it is hashed or read).
_FILE_CEILINGS = {WEIGHTS: MAX_WEIGHTS_BYTES, EXTRAS: MAX_EXTRAS_BYTES + (1 << 20)}


def _check_file(d: Path, name: str, manifest: Manifest, *, required: bool) -> Path | None:
    p = d / name
    info = manifest.files.get(name)
    if not p.is_file():
        if required or info is not None:
            raise BundleError(f"bundle file {name} is missing", path=str(d))
        return None
    if info is None:
        if required:
            raise BundleError(f"manifest.json has no checksum for {name}", path=str(d))
        log.warning("%s: %s is not listed in the manifest; ignored", d, name)
        return None
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise BundleError(f"{name} cannot be read ({exc.strerror or exc})", path=str(d)) from exc
    ceiling = _FILE_CEILINGS.get(name)
    if ceiling is not None and size > ceiling:
        raise BundleError(f"{name} is {size} bytes, over the {ceiling >> 20} MiB limit; refused unread",
                          path=str(d))
    want = info.get("bytes")
    if isinstance(want, int) and size != want:
        what = "truncated" if size < want else "longer than recorded"
        raise BundleError(f"{name} is {what} ({size} bytes, manifest says {want})", path=str(d))
    try:
        sha = sha256_file(p)
    except OSError as exc:
        raise BundleError(f"{name} cannot be read ({exc.strerror or exc})", path=str(d)) from exc
    if info.get("sha256") and sha != info["sha256"]:
        raise BundleError(f"{name} SHA-256 {sha[:12]}... does not match the manifest "
                          f"({str(info['sha256'])[:12]}...); the file was changed or damaged", path=str(d))
    return p


#: Largest pickle (``data.pkl``: tensor names and metadata) a weights file may hold; a real
#: state dict's is ~100 bytes per tensor.
MAX_WEIGHTS_PICKLE_BYTES = 16 << 20


def _check_weights_zip(p: Path, bundle: str) -> None:
    """``weights.pt`` must be torch's zip format with stored (uncompressed) members within the
    size limits, so reading it never inflates or unpickles more than :data:`MAX_WEIGHTS_BYTES`."""
    try:
        with zipfile.ZipFile(p) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{WEIGHTS} cannot be read (truncated or not a torch zip file): {_first_line(exc)}",
                          path=bundle) from exc
    if sum(m.file_size for m in members) > MAX_WEIGHTS_BYTES:
        raise BundleError(f"{WEIGHTS} declares more than {MAX_WEIGHTS_BYTES >> 20} MiB; refused unread", path=bundle)
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            raise BundleError(f"{WEIGHTS} member '{m.filename[:80]}' is compressed; torch writes stored "
                              f"members only; refused unread", path=bundle)
        if m.filename.endswith(".pkl") and m.file_size > MAX_WEIGHTS_PICKLE_BYTES:
            raise BundleError(f"{WEIGHTS} holds a {m.file_size}-byte pickle (limit "
                              f"{MAX_WEIGHTS_PICKLE_BYTES >> 20} MiB); refused unread", path=bundle)


def _load_state_dict(p: Path, bundle: str) -> dict[str, torch.Tensor]:
    _check_weights_zip(p, bundle)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise BundleError(f"{WEIGHTS} holds objects other than tensors and was refused "
                          f"(unsafe pickle payload; never executed): {_first_line(exc)}",
                          path=bundle) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, one typed error
        raise BundleError(f"{WEIGHTS} cannot be read (truncated or not a torch file): "
                          f"{_first_line(exc)}",
                          path=bundle) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BundleError(f"{WEIGHTS} is not a state_dict (got {type(state).__name__})", path=bundle)
    return dict(state)


def _npy_header(zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of an ``.npy`` member (reads only its header)."""
    from numpy.lib import format as npformat

    with zf.open(member) as fh:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npformat.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unknown .npy version {version}")
        header = fh.tell()
    return tuple(int(n) for n in shape), np.dtype(dtype), header


def _check_extras_budget(p: Path, bundle: str) -> None:
    """Refuse ``extras.npz`` whose members declare more than :data:`MAX_EXTRAS_BYTES` (zip sizes
    and ``.npy`` headers), object or structured arrays, before anything is inflated."""
    with zipfile.ZipFile(p) as zf:
        members = zf.infolist()
        if len(members) > MAX_EXTRAS_MEMBERS:
            raise BundleError(f"{EXTRAS} holds {len(members)} arrays (limit {MAX_EXTRAS_MEMBERS})", path=bundle)
        declared = sum(m.file_size for m in members)
        if declared > MAX_EXTRAS_BYTES:
            raise BundleError(f"{EXTRAS} declares {declared} uncompressed bytes, over the "
                              f"{MAX_EXTRAS_BYTES >> 20} MiB limit; refused before inflating", path=bundle)
        total = 0
        for m in members:
            shape, dtype, header = _npy_header(zf, m)
            if dtype.hasobject or dtype.kind not in "biufcUS":
                raise BundleError(f"extra array '{m.filename}' has dtype {dtype}; only numeric/string "
                                  f"arrays are allowed", path=bundle)
            nbytes = math.prod(shape) * dtype.itemsize
            total += nbytes
            if nbytes > m.file_size - header or total > MAX_EXTRAS_BYTES:
                what = ("more than its zip entry holds" if nbytes > m.file_size - header
                        else f"over the {MAX_EXTRAS_BYTES >> 20} MiB limit")
                raise BundleError(f"extra array '{m.filename}' declares shape {shape} {dtype} "
                                  f"({nbytes} bytes), {what}; refused before allocating", path=bundle)


#: Side of the CIA hash codes (``normal_bank_codes`` are ``[N, HASH_SIDE**2]``, models/cia.py).
_HASH_SIDE = 16


def _check_known_extras(extras: Mapping[str, np.ndarray], manifest: Manifest, bundle: str) -> None:
    """The arrays the explainers read must have the shapes they expect (module docstring)."""
    def refuse(key: str, want: str) -> None:
        a = extras[key]
        raise BundleError(f"extra array '{key}' must be {want}, got {a.dtype} {tuple(a.shape)}", path=bundle)

    bank = extras.get("normal_bank_images")
    if bank is not None and (bank.ndim != 3 or bank.dtype.kind not in "uif" or min(bank.shape) < 2):
        refuse("normal_bank_images", "[N, S, S] numeric images (N >= 1, S >= 2)")
    n = bank.shape[0] if bank is not None else None
    codes = extras.get("normal_bank_codes")
    if codes is not None and (codes.ndim != 2 or codes.dtype.kind not in "uif"
                              or codes.shape[1] != _HASH_SIDE ** 2 or (n is not None and codes.shape[0] != n)):
        refuse("normal_bank_codes", f"[N, {_HASH_SIDE ** 2}] numbers, one row per bank image")
    ids = extras.get("normal_bank_ids")
    if ids is not None and (ids.ndim != 1 or (n is not None and ids.shape[0] != n)):
        refuse("normal_bank_ids", "[N] names, one per bank image")
    psi = extras.get("disease_masks")
    if psi is not None and (psi.ndim != 3 or psi.dtype.kind not in "uif" or psi.shape[0] != len(manifest.classes)
                            or min(psi.shape) < 1):
        refuse("disease_masks", f"[{len(manifest.classes)}, h, w] numbers, one mask per class")


def _load_extras(p: Path | None, bundle: str) -> dict[str, np.ndarray]:
    """The arrays of ``extras.npz`` (budget checked first, no pickle, finite floats only)."""
    if p is None:
        return {}
    try:
        _check_extras_budget(p, bundle)
        with np.load(p, allow_pickle=False) as z:
            out = {k: np.asarray(z[k]) for k in z.files}
    except BundleError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused; or a malformed header
        raise BundleError(f"{EXTRAS} holds object arrays or malformed headers and was refused: "
                          f"{_first_line(exc)}", path=bundle) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, one typed error
        raise BundleError(f"{EXTRAS} cannot be read: {type(exc).__name__}: {_first_line(exc)}", path=bundle) from exc
    for k, a in out.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise BundleError(f"extra array '{k}' holds NaN or infinite values; refused", path=bundle)
    return out


def _create(create_model: Any, manifest: Manifest, path: str | None) -> torch.nn.Module:
    """``create_model`` with the manifest's kwargs; any failure is one :class:`BundleError` line."""
    try:
        return create_model(manifest.architecture, **manifest.arch_kwargs)
    except ModelError as exc:
        raise BundleError(f"cannot build '{manifest.architecture}': {_first_line(exc)}", path=path) from exc
    except TypeError as exc:
        raise BundleError(f"bad arch_kwargs for '{manifest.architecture}': {_first_line(exc)}", path=path) from exc
    except Exception as exc:  # noqa: BLE001 - allocator RuntimeError, MemoryError, a factory's ValueError...
        raise BundleError(f"cannot build '{manifest.architecture}' with {_short(manifest.arch_kwargs, 200)}: "
                          f"{type(exc).__name__}: {_first_line(exc)}", path=path) from exc


def build_model(manifest: Manifest, *, path: str | None = None) -> torch.nn.Module:
    """Construct the (random-weight) network a manifest describes.

    It is first built on the ``meta`` device (no memory) and refused when it would hold more
    than :data:`MAX_PARAMETERS` elements.
    """
    create_model, get_spec = _registry()
    try:
        spec = get_spec(manifest.architecture)
    except (ModelError, KeyError) as exc:
        raise BundleError(f"unknown architecture '{manifest.architecture}' (not in the model "
                          f"registry of this cxrviewer)", path=path) from exc
    if spec.family != manifest.family:
        raise BundleError(f"manifest family '{manifest.family}' disagrees with the registry "
                          f"('{manifest.architecture}' is a {spec.family})", path=path)
    with torch.device("meta"):
        ghost = _create(create_model, manifest, path)
    n = sum(t.numel() for t in ghost.parameters()) + sum(t.numel() for t in ghost.buffers())
    del ghost
    if n > MAX_PARAMETERS:
        raise BundleError(f"'{manifest.architecture}' with {_short(manifest.arch_kwargs, 200)} would hold "
                          f"{n:,} parameters, over the {MAX_PARAMETERS:,} limit; refused before allocating",
                          path=path)
    return _create(create_model, manifest, path)


def _check_finite(state: Mapping[str, torch.Tensor], names: Iterable[str], path: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor."""
    for k in names:
        v = state[k]
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise BundleError(f"weights tensor '{k}' holds NaN or infinite values; the bundle was refused",
                              path=path)


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedBundle:
    """Read, verify and build a bundle; the model is in eval mode with ``requires_grad`` off.

    Checks (each a :class:`BundleError` naming the problem): manifest size, JSON,
    format version and schema (types, ranges, class names from the label set),
    known architecture and its size (counted before allocating), file sizes and
    SHA-256, the declared sizes of ``extras.npz`` (before inflating), tensors only
    in the weights (``torch.load(weights_only=True)``), tensor names, shapes and
    finiteness, class count versus the network's outputs. Nothing else escapes:
    an unforeseen failure is a :class:`BundleError` too (the cause chained).
    """
    d = _bundle_dir(path)
    try:
        return _load_bundle(d, device)
    except CxrError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the folder holds, one typed error
        log.debug("loading %s failed", d, exc_info=True)
        raise BundleError(f"cannot load the bundle: {type(exc).__name__}: {_first_line(exc)}", path=str(d)) from exc


def _load_bundle(d: Path, device: str | torch.device) -> LoadedBundle:
    """:func:`load_bundle` without its last-resort error wrapping."""
    manifest = read_manifest(d)
    bundle = str(d)
    wpath = _check_file(d, WEIGHTS, manifest, required=True)
    assert wpath is not None
    epath = _check_file(d, EXTRAS, manifest, required=False)
    extras = _load_extras(epath, bundle)
    _check_known_extras(extras, manifest, bundle)
    model = build_model(manifest, path=bundle)
    _check_classes(model, manifest, bundle)
    state = _load_state_dict(wpath, bundle)
    _check_state_dict(model, state, bundle)
    _check_finite(state, model.state_dict(), bundle)
    try:
        model.load_state_dict(state, strict=True)
        if "disease_masks" in extras and callable(getattr(model, "set_disease_masks", None)):
            model.set_disease_masks(torch.from_numpy(np.asarray(extras["disease_masks"], dtype=np.float32)))
    except (RuntimeError, TypeError, ValueError, ModelError) as exc:
        raise BundleError(f"weights or extras do not fit '{manifest.architecture}': "
                          f"{_first_line(exc)}", path=bundle) from exc
    del state
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    return LoadedBundle(model=model, manifest=manifest, extras=extras, path=d)


# ---------------------------------------------------------------------------
def _check_extras(extras: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in extras.items():
        a = np.asarray(v)
        if a.dtype == object:
            raise BundleError(f"extra array '{k}' has dtype object; only numeric/string arrays are allowed")
        out[str(k)] = a
    return out


_STORE_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _new_manifest(model: torch.nn.Module, p: Path, *, classes: Iterable[str], input_size: int | tuple[int, int],
                  normalisation: Mapping[str, Any] | None, crop: Mapping[str, Any] | None,
                  canonical_chest: Mapping[str, Any] | None, name: str | None, description: str,
                  role: str | None, extras_info: Mapping[str, Any] | None, inference: Mapping[str, Any] | None,
                  provenance: Mapping[str, Any] | None,
                  label_set: str | Mapping[str, Any] | LabelSet | None = None) -> Manifest:
    """The manifest :func:`save_bundle` writes for ``model`` at ``p`` (validated, files not yet listed)."""
    arch = getattr(model, "arch", None)
    family = getattr(model, "family", None)
    if not arch or not family:
        raise BundleError("model has no 'arch'/'family' attributes; build it with "
                          "cxrviewer.core.models.create_model", path=str(p))
    size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    prov: dict[str, Any] = {"research_demo": False, "trained": True}
    prov.update(dict(provenance or {}))
    prov.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov.setdefault("git_commit", _git_commit())
    manifest = Manifest(
        architecture=str(arch),
        family=str(family),
        classes=tuple(classes),
        input_size=(size[0], size[1]),
        label_set=(label_set.name if isinstance(label_set, LabelSet) and label_set.name in BUILTIN_SETS
                   else label_set.to_json() if isinstance(label_set, LabelSet)
                   else dict(label_set) if isinstance(label_set, Mapping) else label_set),
        normalisation=dict(_current_spelling(normalisation or {"kind": "minus1_1"})),
        arch_kwargs=dict(getattr(model, "arch_kwargs", {}) or {}),
        crop=dict(crop or {"kind": "none"}),
        canonical_chest=dict(canonical_chest) if canonical_chest else None,
        name=name or p.name[: -len(BUNDLE_SUFFIX)],
        description=description,
        role=role,
        provenance=prov,
        extras_info=dict(extras_info or {}),
        inference=dict(inference or {}),
        cxrviewer_version=_cxr_version(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    Manifest.from_dict(manifest.to_dict(), path=str(p))  # validate what we write
    _check_classes(model, manifest, str(p))
    return manifest


def _write_files(folder: Path, model: torch.nn.Module, manifest: Manifest, arrays: Mapping[str, np.ndarray],
                 store_dtype: torch.dtype | None) -> None:
    """Weights, extras and the manifest (with their checksums) into ``folder``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if store_dtype is not None:
        state = {k: (v.to(store_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, folder / WEIGHTS)
    files = {WEIGHTS: {"sha256": sha256_file(folder / WEIGHTS), "bytes": (folder / WEIGHTS).stat().st_size}}
    if arrays:
        with open(folder / EXTRAS, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        files[EXTRAS] = {"sha256": sha256_file(folder / EXTRAS), "bytes": (folder / EXTRAS).stat().st_size}
    manifest.files = files
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n",
                                   encoding="utf-8")


def _move_into_place(tmp: Path, p: Path) -> None:
    """Rename the finished folder ``tmp`` to ``p``, replacing an older bundle there."""
    if p.exists():
        old = p.with_name(f".{p.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, p)


def save_bundle(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    classes: Iterable[str],
    input_size: int | tuple[int, int],
    normalisation: Mapping[str, Any] | None = None,
    crop: Mapping[str, Any] | None = None,
    canonical_chest: Mapping[str, Any] | None = None,
    name: str | None = None,
    description: str = "",
    role: str | None = None,
    extras: Mapping[str, Any] | None = None,
    extras_info: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    weights_dtype: str | None = None,
    label_set: str | Mapping[str, Any] | LabelSet | None = None,
) -> Path:
    """Write ``model`` as a bundle folder at ``path`` (``.cxrbundle`` appended if absent).

    The model must come from the registry (attributes ``arch``, ``arch_kwargs``,
    ``family``). The folder is written beside the target and renamed into place,
    so a reader never sees half a bundle. Returns the bundle path.

    ``weights_dtype="float16"`` stores floating-point tensors in half precision
    (half the size on disk, for the bundles shipped in ``resources/``); loading
    casts them back to the network's own dtype.

    ``label_set``: the set ``classes`` come from (:mod:`cxrviewer.core.labelsets`: a built-in
    name, a :class:`LabelSet` or its JSON); None: the family's default (NIH-14 for classifiers).
    """
    if weights_dtype not in tuple(_STORE_DTYPES):
        raise BundleError(f"weights_dtype must be float32, float16 or bfloat16, not {weights_dtype!r}")
    p = Path(path)
    if not p.name.endswith(BUNDLE_SUFFIX):
        p = p.with_name(p.name + BUNDLE_SUFFIX)
    manifest = _new_manifest(model, p, classes=classes, input_size=input_size, normalisation=normalisation,
                             crop=crop, canonical_chest=canonical_chest, name=name, description=description,
                             role=role, extras_info=extras_info, inference=inference, provenance=provenance,
                             label_set=label_set)
    arrays = _check_extras(extras or {})
    if p.exists() and not overwrite:
        raise BundleError("bundle already exists (pass overwrite=True)", path=str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_beside(p)
    try:
        _write_files(tmp, model, manifest, arrays, _STORE_DTYPES[weights_dtype])
        _move_into_place(tmp, p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote bundle %s (%s, %d classes)", p, manifest.architecture, len(manifest.classes))
    return p


def default_models_dir() -> Path:
    """``resources/models`` of the checkout, or of the frozen app (PyInstaller ``_MEIPASS``)."""
    import sys

    base = getattr(sys, "_MEIPASS", None)
    root = Path(base) if base else Path(__file__).resolve().parents[2]
    return root / "resources" / "models"
