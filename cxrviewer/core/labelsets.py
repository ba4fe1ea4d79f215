"""Label sets as data: a named list of class names with synonyms (Qt-free).

A label set says which class names an annotation project, a model bundle or an
import may use. Built in: ``nih14`` (the NIH ChestX-ray14 classes, the order of
every tensor axis of our own models: :mod:`cxrviewer.core.classes`),
``torchxrayvision18`` (torchxrayvision's 18 default pathologies),
``vindr-cxr`` (the 14 local labels of the VinDr-CXR challenge), ``rsna-pneumonia``
("Lung Opacity") and ``lung-heart`` (the segmentation bundles' structures). A user's
set is a JSON file ``{"name": ..., "labels": [...], "synonyms": {"alias": "label"}}``
or a text file with one label per line (``alias = label`` lines add synonyms).

Names match by :func:`normalise` (case, spaces, ``_`` and ``-`` are not told apart),
then by the set's synonyms (Infiltrate -> Infiltration, Pleural Thickening ->
Pleural_Thickening, Pleural effusion -> Effusion, ...). :func:`map_names` maps one
set's names onto another's and lists what it cannot map; explicit ``A=B`` choices
win over synonyms.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .classes import ALIASES, CLASSES
from .errors import LabelSetError, UnmappedLabelsError

#: the largest label set (and label-set file) read
MAX_LABELS = 1000
MAX_LABEL_CHARS = 128
MAX_FILE_BYTES = 1 << 20


def normalise(name: str) -> str:
    """The form names are matched in: lower case, ``_``/``-``/runs of spaces as one space."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().casefold()


@dataclass(frozen=True)
class LabelSet:
    """A named, ordered list of class names with synonyms (alias -> label)."""

    name: str
    labels: tuple[str, ...]
    synonyms: Mapping[str, str] = field(default_factory=dict)
    title: str = ""

    def __post_init__(self) -> None:
        if not self.labels or len(self.labels) > MAX_LABELS:
            raise LabelSetError(f"label set {self.name!r} must hold 1..{MAX_LABELS} labels")
        seen: dict[str, str] = {}
        for lab in self.labels:
            if not isinstance(lab, str) or not lab.strip() or len(lab) > MAX_LABEL_CHARS:
                raise LabelSetError(f"label set {self.name!r}: {lab!r} is not a label name "
                                    f"(1..{MAX_LABEL_CHARS} characters)")
            key = normalise(lab)
            if key in seen:
                raise LabelSetError(f"label set {self.name!r} holds {seen[key]!r} and {lab!r}, "
                                    "which match the same name")
            seen[key] = lab
        for alias, target in self.synonyms.items():
            if target not in self.labels:
                raise LabelSetError(f"label set {self.name!r}: synonym {alias!r} names {target!r}, "
                                    "which is not one of its labels")

    @property
    def display_name(self) -> str:
        return self.title or self.name

    @cached_property
    def _lookup(self) -> dict[str, str]:
        """Normalised name -> label, built once per set (canonical() runs per box and per class)."""
        table = {normalise(a): t for a, t in self.synonyms.items()}
        table.update({normalise(lab): lab for lab in self.labels})  # a label always names itself
        return table

    def canonical(self, name: str) -> str | None:
        """The set's label for ``name`` (itself, by normalised spelling, or a synonym); None if unknown."""
        return self._lookup.get(normalise(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) is not None

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, name: str) -> int:
        """Position of ``name``'s label; ``KeyError`` if unknown."""
        lab = self.canonical(name)
        if lab is None:
            raise KeyError(name)
        return self.labels.index(lab)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "title": self.title, "labels": list(self.labels),
                "synonyms": dict(self.synonyms)}


# ---- built-in sets ----------------------------------------------------------------------------
_COMMON_SYNONYMS = {
    "Infiltrate": "Infiltration", "Infiltrates": "Infiltration",
    "Pleural Effusion": "Effusion", "Pleural effusions": "Effusion",
    "Pulmonary fibrosis": "Fibrosis",
    "Pleural thickening": "Pleural_Thickening",
}

NIH14 = LabelSet("nih14", tuple(CLASSES),
                 {**{a: t for a, t in ALIASES.items()},
                  **{a: t for a, t in _COMMON_SYNONYMS.items() if t in CLASSES}},
                 title="NIH ChestX-ray14")

#: torchxrayvision's ``default_pathologies`` (the order of its models' outputs)
TORCHXRAYVISION18 = LabelSet(
    "torchxrayvision18",
    ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
     "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
     "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"),
    {**_COMMON_SYNONYMS, "Opacity": "Lung Opacity", "Lesion": "Lung Lesion"},
    title="torchxrayvision (18 pathologies)")

#: the VinDr-CXR challenge's 14 local (box) labels
VINDR_CXR = LabelSet(
    "vindr-cxr",
    ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
     "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
     "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis"),
    {"Infiltrate": "Infiltration", "Effusion": "Pleural effusion", "Fibrosis": "Pulmonary fibrosis",
     "Pleural_Thickening": "Pleural thickening", "Interstitial lung disease": "ILD",
     "Nodule Mass": "Nodule/Mass"},
    title="VinDr-CXR (14 local labels)")

RSNA_PNEUMONIA = LabelSet("rsna-pneumonia", ("Lung Opacity",), {"Opacity": "Lung Opacity"},
                          title="RSNA Pneumonia Detection (Lung Opacity)")

#: the lung/heart U-Net's output channels, in order (cxrviewer/core/models/unet.py); here, without
#: torch, so that reading a segmentation bundle's manifest never imports the networks
SEGMENTATION_CLASSES: tuple[str, ...] = ("left_lung", "right_lung", "heart")

LUNG_HEART = LabelSet("lung-heart", ("left lung", "right lung", "heart"), {},
                      title="lung/heart segmentation")

BUILTIN: dict[str, LabelSet] = {s.name: s for s in (NIH14, TORCHXRAYVISION18, VINDR_CXR,
                                                    RSNA_PNEUMONIA, LUNG_HEART)}
DEFAULT = NIH14


def builtin_names() -> list[str]:
    return list(BUILTIN)


def _parse_text(text: str, name: str) -> LabelSet:
    labels: list[str] = []
    synonyms: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            alias, _, target = (p.strip() for p in line.partition("="))
            synonyms[alias] = target
        else:
            labels.append(line)
    return LabelSet(name, tuple(labels), synonyms)


def _parse_json(text: str, name: str) -> LabelSet:
    from .jsonsafe import loads_strict

    try:
        data = loads_strict(text)
    except ValueError as exc:
        raise LabelSetError(f"label-set file is not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"labels": data}
    labels, synonyms = (data.get("labels"), data.get("synonyms", {})) if isinstance(data, dict) else (None, None)
    if (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
            or not isinstance(synonyms, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in synonyms.items())):
        raise LabelSetError('a label-set JSON file holds {"labels": [names], "synonyms": {alias: label}}')
    title = data.get("title", "") if isinstance(data.get("title", ""), str) else ""
    return LabelSet(str(data.get("name") or name), tuple(labels), synonyms, title=title)


def load_label_set(path: str | os.PathLike) -> LabelSet:
    """A user's label set from a ``.json`` or text file (see the module docstring)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise LabelSetError(f"no label-set file {p}", path=str(p))
        if p.stat().st_size > MAX_FILE_BYTES:
            raise LabelSetError(f"label-set file is larger than {MAX_FILE_BYTES} bytes", path=str(p))
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelSetError(f"cannot read label-set file: {exc}", path=str(p)) from None
    name = p.stem
    try:
        return _parse_json(text, name) if p.suffix.lower() == ".json" else _parse_text(text, name)
    except LabelSetError as exc:
        raise LabelSetError(str(exc), path=str(p)) from None


def get_label_set(name_or_path: str | os.PathLike | LabelSet) -> LabelSet:
    """A built-in set by name (``nih14``, ``torchxrayvision18``, ...), or a user's file."""
    if isinstance(name_or_path, LabelSet):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]
    norm = normalise(key)
    for s in BUILTIN.values():
        if norm in (normalise(s.name), normalise(s.title)):
            return s
    if os.path.sep in key or key.endswith((".json", ".txt")) or Path(key).is_file():
        return load_label_set(key)
    raise LabelSetError(f"unknown label set {key!r}; built in: {', '.join(BUILTIN)}, or a .json/.txt file")


def label_set_from_json(data: object) -> LabelSet:
    """The inverse of :meth:`LabelSet.to_json` (a built-in set may be given by name only)."""
    if isinstance(data, str):
        return get_label_set(data)
    if not isinstance(data, dict):
        raise LabelSetError("a stored label set must be a name or an object")
    name = data.get("name")
    if isinstance(name, str) and name in BUILTIN and "labels" not in data:
        return BUILTIN[name]
    return _parse_json(json.dumps(data), str(name or "custom"))


def parse_mapping(pairs: Iterable[str]) -> dict[str, str]:
    """``["A=B", ...]`` (the CLI's ``--map``) as ``{A: B}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise LabelSetError(f"--map takes SOURCE=TARGET, got {pair!r}")
        out[src.strip()] = dst.strip()
    return out


def map_names(names: Iterable[str], target: LabelSet, explicit: Mapping[str, str] | None = None
              ) -> tuple[dict[str, str], list[str]]:
    """Map each name to ``target``'s label: explicit ``{source: target label}`` first, then the
    spelling and synonyms of ``target``. Returns ``(mapping, unmapped)`` (unmapped in first-seen order)."""
    explicit_norm = {normalise(k): v for k, v in (explicit or {}).items()}
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for name in names:
        if name in mapping or name in unmapped:
            continue
        chosen = explicit_norm.get(normalise(name))
        lab = target.canonical(chosen) if chosen is not None else target.canonical(name)
        if chosen is not None and lab is None:
            raise LabelSetError(f"--map {name}={chosen}: {chosen!r} is not in the {target.display_name} label set")
        if lab is None:
            unmapped.append(name)
        else:
            mapping[name] = lab
    return mapping, unmapped


def require_mapped(names: Iterable[str], target: LabelSet, explicit: Mapping[str, str] | None = None, *,
                   what: str = "classes", hint: str = "--map NAME=LABEL or --add-unknown") -> dict[str, str]:
    """:func:`map_names`, raising :class:`UnmappedLabelsError` (listing them and ``hint``) if any is unmapped."""
    mapping, unmapped = map_names(names, target, explicit)
    if unmapped:
        shown = ", ".join(repr(u) for u in unmapped[:10]) + (f" (and {len(unmapped) - 10} more)"
                                                             if len(unmapped) > 10 else "")
        raise UnmappedLabelsError(f"{len(unmapped)} {what} not in the {target.display_name} label set: "
                                  f"{shown}; map them with {hint}", unmapped, target.name)
    return mapping


def extended(base: LabelSet, extra: Iterable[str], name: str | None = None) -> LabelSet:
    """``base`` with the ``extra`` names appended (``--add-unknown``)."""
    add = [e for e in dict.fromkeys(extra) if e not in base]
    return LabelSet(name or base.name + "+custom", base.labels + tuple(add), dict(base.synonyms),
                    title=(base.display_name + f" + {len(add)} added") if add else base.title)


def guess_label_set(classes: Sequence[str]) -> LabelSet | None:
    """The smallest built-in set holding every one of ``classes`` (None if none does)."""
    fits = [s for s in BUILTIN.values() if all(c in s for c in classes)]
    return min(fits, key=len) if fits else None
