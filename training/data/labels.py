"""The class list a trainer trains: from the data, never fixed to the NIH 14.

* an NIH-layout folder alone trains the NIH 14 (:data:`cxrviewer.core.labelsets.NIH14`);
* ``--annotations PROJECT`` trains the project's label set (all its labels, in its order:
  ``AnnotationStore.label_set``), the folder's NIH labels and boxes mapped onto it by name and
  synonym (:meth:`LabelSet.canonical`);
* ``--label-set NAME|FILE`` names the set for a folder (its NIH labels mapped the same way).

Nothing is dropped silently: a label or box whose class is not in the training set is counted
per class (:class:`Dropped`) and reported in one warning line with the class names, and the
counts go into the written bundle's provenance.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.labelsets import BUILTIN, LabelSet

from .records import Record

log = logging.getLogger(__name__)

__all__ = ["Annotated", "Dropped", "boxed_classes", "is_nih14", "manifest_label_set", "read_annotations",
           "remap_records"]


@dataclass
class Dropped:
    """Per class name: image labels and boxes left out because the class is not trained."""

    labels: Counter = field(default_factory=Counter)
    boxes: Counter = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.labels or self.boxes)

    def line(self, label_set: LabelSet) -> str:
        """The one warning line: how many labels/boxes of which classes were left out."""
        parts = []
        for what, counts in (("image labels", self.labels), ("boxes", self.boxes)):
            if counts:
                names = ", ".join(f"{n!r} x{k}" for n, k in sorted(counts.items()))
                parts.append(f"{sum(counts.values())} {what} ({names})")
        return (f"left out {' and '.join(parts)}: their classes are not among the {len(label_set)} classes "
                f"of the training label set {label_set.display_name}")

    def warn(self, label_set: LabelSet) -> None:
        """Log :meth:`line` once as a warning (nothing when nothing was dropped)."""
        if self:
            log.warning("%s", self.line(label_set))

    def to_json(self) -> dict[str, dict[str, int]]:
        """``{"labels": {class: n}, "boxes": {class: n}}`` (what the bundle's provenance records)."""
        return {"labels": dict(sorted(self.labels.items())), "boxes": dict(sorted(self.boxes.items()))}


def is_nih14(label_set: LabelSet | Sequence[str]) -> bool:
    """Whether ``label_set`` is the NIH 14 in the NIH order (the set the NIH-only parts know)."""
    labels = label_set.labels if isinstance(label_set, LabelSet) else tuple(label_set)
    return tuple(labels) == tuple(CLASSES)


def boxed_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Classes scored for localisation: the NIH boxed 8 for the NIH 14 (the official boxes have
    only those), every class for another set (its boxes are the project's own)."""
    from cxrviewer.core.classes import BOXED_CLASSES

    return tuple(BOXED_CLASSES) if is_nih14(classes) else tuple(classes)


def manifest_label_set(label_set: LabelSet) -> str | dict[str, Any]:
    """What a bundle's manifest ``label_set`` records: a built-in set's name, else the set's JSON
    (a user's set, or an extended one such as ``nih14+custom``)."""
    return label_set.name if BUILTIN.get(label_set.name) == label_set else label_set.to_json()


def map_boxes(boxes: Iterable[Box], label_set: LabelSet, dropped: Dropped) -> list[Box]:
    """``boxes`` renamed to ``label_set``'s labels (spelling/synonym); the others counted in ``dropped``."""
    out = []
    for b in boxes:
        lab = label_set.canonical(b.label)
        if lab is None:
            dropped.boxes[b.label] += 1
        else:
            out.append(b if lab == b.label else Box(lab, b.x, b.y, b.w, b.h))
    return out


def map_labels(values: Mapping[str, float], label_set: LabelSet, dropped: Dropped) -> np.ndarray:
    """A ``[len(label_set)]`` float32 vector from ``{class name: 0/1}`` (present names outside the set
    counted in ``dropped``; absent ones carry nothing and are not counted)."""
    out = np.zeros(len(label_set), np.float32)
    for name, v in values.items():
        lab = label_set.canonical(name)
        if lab is None:
            if v:
                dropped.labels[name] += 1
            continue
        out[label_set.labels.index(lab)] = max(out[label_set.labels.index(lab)], float(v))
    return out


def remap_records(records: list[Record], label_set: LabelSet, dropped: Dropped,
                  source: Sequence[str] = CLASSES) -> list[Record]:
    """``records`` (labels in ``source`` order, default the NIH 14 of :func:`load_records`) with
    labels in ``label_set`` order and boxes renamed to its labels; the unmapped counted in ``dropped``.
    The records themselves are returned unchanged when ``label_set`` is ``source``."""
    if tuple(label_set.labels) == tuple(source):
        return records
    out = []
    for r in records:
        labels = map_labels(dict(zip(source, r.labels.tolist())), label_set, dropped)
        out.append(Record(r.path, r.key, labels, map_boxes(r.boxes, label_set, dropped), r.patient_id))
    return out


@dataclass
class Annotated:
    """Training records with an annotation project applied (:func:`read_annotations`)."""

    records: list[Record]
    label_set: LabelSet
    dropped: Dropped
    counts: dict[str, int]

    def provenance(self, path: str) -> dict[str, Any]:
        """What the written bundle records of the project: path, label set, counts, what was left out."""
        return {"path": str(path), "label_set": manifest_label_set(self.label_set), **self.counts,
                "left_out": self.dropped.to_json()}


def _apply(rec: Record, tr: Any, label_set: LabelSet, dropped: Dropped, counts: Counter) -> None:
    """The project's labels (present 1 / absent 0; uncertain keeps the folder's) and accepted boxes
    (they replace the folder's; a box's class is present) onto ``rec``."""
    labels = rec.labels.copy()
    for name, v in tr.labels.items():
        lab = label_set.canonical(name)
        if lab is None:
            dropped.labels[name] += 1
        elif v in (0, 1):
            labels[label_set.labels.index(lab)] = float(v)
            counts["labels_used"] += 1
    boxes = map_boxes(tr.boxes, label_set, dropped)
    for b in boxes:
        labels[label_set.labels.index(b.label)] = 1.0
    counts["boxes_used"] += len(boxes)
    rec.labels = labels
    if tr.boxes:
        rec.boxes = boxes


def read_annotations(records: list[Record], store_path: Any, *, status: list[str] | None = None) -> Annotated:
    """``records`` (an NIH folder's, NIH-14 labels; may be empty) with the project's labels and boxes
    applied, every label in the project's label set (all its labels, in its order).

    Matched by file stem (the NIH key); a project image the folder lacks is added when its file is
    readable and it has labels or boxes (else counted in ``images_skipped``). The folder's labels and
    boxes are mapped onto the project's set by name and synonym; the others are counted in
    ``dropped`` (:meth:`Dropped.warn`).
    """
    from pathlib import Path

    from cxrviewer.core.annotations import AnnotationStore, iter_training_records

    counts: Counter = Counter(labels_used=0, boxes_used=0)
    dropped = Dropped()
    with AnnotationStore(store_path, read_only=True) as store:
        label_set = store.label_set
        out = remap_records(list(records), label_set, dropped)
        by_key = {r.key: r for r in out}
        for tr in iter_training_records(store, status=status):
            counts["project_labels"] += sum(v in (0, 1) for v in tr.labels.values())
            counts["project_boxes"] += len(tr.boxes)
            key = Path(tr.identity.file_name or (tr.path or "")).stem
            rec = by_key.get(key)
            if rec is None:
                if not (tr.labels or tr.boxes):
                    continue
                if not tr.path or not Path(tr.path).is_file():
                    counts["images_skipped"] += 1
                    dropped.labels.update(n for n, v in tr.labels.items() if v == 1)
                    dropped.boxes.update(b.label for b in tr.boxes)
                    continue
                rec = by_key[key] = Record(Path(tr.path), key, np.zeros(len(label_set), np.float32), [],
                                           f"annotations:{key}")
                out.append(rec)
                counts["images_added"] += 1
            else:
                counts["images_updated"] += 1
            _apply(rec, tr, label_set, dropped, counts)
    log.info("annotations %s (%s, %d classes): %d images updated, %d added, %d labels and %d boxes used",
             store_path, label_set.display_name, len(label_set), counts["images_updated"], counts["images_added"],
             counts["labels_used"], counts["boxes_used"])
    if counts["images_skipped"]:
        log.warning("annotations %s: %d annotated images left out (file not readable and not in --data)",
                    store_path, counts["images_skipped"])
    return Annotated(out, label_set, dropped, {k: int(counts[k]) for k in (
        "images_updated", "images_added", "images_skipped", "project_labels", "project_boxes",
        "labels_used", "boxes_used")})
