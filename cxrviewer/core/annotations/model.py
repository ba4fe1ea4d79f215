"""Plain data of the annotation store: studies, labels, boxes, proposals, edits.

Nothing here touches SQLite; :mod:`.store` reads and writes these records.
An :class:`Edit` is a list of primitive :class:`Op` (one row created, changed or
deleted, with its full *before* and *after* snapshot), so every edit is
inverse-able: :meth:`Edit.inverse` swaps before/after and reverses the order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from ..errors import AnnotationConflictError, AnnotationStoreError
from ..geometry import Box

#: Image-level label states (a missing row means "not set").
LABEL_STATES: tuple[str, ...] = ("present", "absent", "uncertain")
#: Integer codes used by :func:`iter_training_records` (CheXpert convention: u = -1).
LABEL_CODES: dict[str, int] = {"present": 1, "absent": 0, "uncertain": -1}
#: Review status per study, in workflow order.
REVIEW_STATUSES: tuple[str, ...] = ("unseen", "in_progress", "done", "verified")
#: Where an accepted box came from.
BOX_SOURCES: tuple[str, ...] = ("manual", "model")
#: Life cycle of a model proposal.
PROPOSAL_STATUSES: tuple[str, ...] = ("pending", "accepted", "rejected")


class InvalidBoxError(AnnotationStoreError, ValueError):
    """A box is empty, not finite, outside the image or of a class outside the project's label
    set (:meth:`~cxrviewer.core.annotations.AnnotationStore.check_label`)."""


class EditConflictError(AnnotationConflictError):
    """An undo/redo no longer matches the stored rows.

    Raised when another store instance changed the same row in between; nothing
    is written and the undo stack is left as it was. A plain edit from a stale
    read raises its base class, :class:`~cxrviewer.core.errors.AnnotationConflictError`.
    """


def utc_now() -> str:
    """Current UTC time as ISO 8601 with milliseconds (``2026-01-02T03:04:05.678+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class StudyIdentity:
    """What makes an image the same image after its folder moved.

    DICOM: the SOP Instance UID. Otherwise the SHA-256 of the decoded *stored*
    pixel values (:meth:`cxrviewer.core.study.Study.pixel_sha256`): unlike a hash
    of the file bytes it survives a lossless re-save (PNG recompression, stripped
    metadata) and it is the hash ``Study.study_id`` already uses. ``file_name`` is
    the base name only (no folders, which may carry a patient's name) and is used
    as a hint to resolve studies imported from CSV/COCO files (which carry no
    identity) the first time the image is opened.
    """

    file_name: str
    sop_uid: str | None = None
    sha256: str | None = None

    @property
    def key(self) -> str:
        """``sop:<uid>``, ``sha256:<hex>`` or ``name:<file>`` for unresolved imports."""
        if self.sop_uid:
            return f"sop:{self.sop_uid}"
        if self.sha256:
            return f"sha256:{self.sha256}"
        return f"name:{self.file_name}"

    @property
    def resolved(self) -> bool:
        return bool(self.sop_uid or self.sha256)

    @classmethod
    def from_study(cls, study: Any) -> "StudyIdentity":
        """Identity of a loaded :class:`~cxrviewer.core.study.Study`."""
        from pathlib import PurePath

        name = PurePath(study.meta.source_path).name
        if study.meta.sop_uid:
            return cls(file_name=name, sop_uid=str(study.meta.sop_uid))
        return cls(file_name=name, sha256=study.pixel_sha256())


@dataclass(frozen=True)
class StudyRecord:
    """One row of ``studies``: identity, last-seen path, image size, review status."""

    id: int
    identity: StudyIdentity
    path: str | None
    width: int
    height: int
    status: str
    status_by: str | None
    status_at: str | None
    created: str
    last_seen: str


@dataclass(frozen=True)
class _StudyBox:
    """The columns a box row starts with: row id, study, class and geometry in image pixels.

    Each subclass declares a ``score`` field (``None`` where there is none), which
    :meth:`to_box` keeps.
    """

    id: int
    study_id: int
    label: str
    x: float
    y: float
    w: float
    h: float

    def to_box(self) -> Box:
        """The plain geometry :class:`~cxrviewer.core.geometry.Box` (score kept for model boxes)."""
        return Box(self.label, self.x, self.y, self.w, self.h, self.score)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AnnotatedBox(_StudyBox):
    """An accepted box with its provenance (who, when, manual or model, which model)."""

    annotator: str
    created: str
    modified: str
    modified_by: str
    source: str  # "manual" | "model"
    model_name: str | None = None
    score: float | None = None
    proposal_id: int | None = None
    version: int = 1  # row version, bumped on every update (optimistic concurrency)


@dataclass(frozen=True)
class Proposal(_StudyBox):
    """A model's box proposal, kept apart from accepted boxes until accepted."""

    model_name: str
    score: float | None
    status: str  # "pending" | "accepted" | "rejected"
    created: str
    decided_by: str | None = None
    decided_at: str | None = None


@dataclass(frozen=True)
class Op:
    """One primitive change: ``before is None`` = create, ``after is None`` = delete.

    ``entity`` is ``"box"``, ``"label"``, ``"status"`` or ``"proposal"``; ``key`` the
    row key (box/proposal/study id, or ``(study_id, class)`` for labels). The
    snapshots are full rows as plain dicts (JSON-able).
    """

    entity: str
    key: Any
    before: dict | None
    after: dict | None

    @property
    def action(self) -> str:
        if self.before is None:
            return "create"
        if self.after is None:
            return "delete"
        return "update"

    @property
    def study_id(self) -> int:
        row = self.after if self.after is not None else self.before
        assert row is not None
        return int(row["study_id"] if "study_id" in row else row["id"])

    def inverse(self) -> "Op":
        return Op(self.entity, self.key, self.after, self.before)


@dataclass(frozen=True)
class Edit:
    """A committed (or, inside a batch, pending) change: one undo step.

    ``id`` is the row id in the ``edits`` log (``None`` for a no-op or a part of a
    batch not yet committed). ``undo_of`` names the edit an undo/redo re-applied.
    """

    id: int | None
    kind: str
    description: str
    ops: tuple[Op, ...]
    who: str = ""
    at: str = ""
    undo_of: int | None = None

    @property
    def empty(self) -> bool:
        return not self.ops

    @property
    def study_ids(self) -> tuple[int, ...]:
        """Studies touched, in first-touched order (for the GUI to redraw)."""
        seen: dict[int, None] = {}
        for op in self.ops:
            seen.setdefault(op.study_id, None)
        return tuple(seen)

    @property
    def box_ids(self) -> tuple[int, ...]:
        return tuple(int(op.key) for op in self.ops if op.entity == "box")

    def inverse(self) -> "Edit":
        """The edit that undoes this one (not yet committed: ``id`` is ``None``)."""
        return Edit(None, "undo", f"Undo {self.description}",
                    tuple(op.inverse() for op in reversed(self.ops)), undo_of=self.id)


class TrainingRecord(NamedTuple):
    """What :func:`iter_training_records` yields for one study."""

    identity: StudyIdentity
    path: str | None
    labels: dict[str, int]  # class -> 1 present / 0 absent / -1 uncertain (unset omitted)
    boxes: list[Box]


@dataclass
class BoxGeometry:
    """A validated, clamped box geometry (internal helper for the store)."""

    x: float
    y: float
    w: float
    h: float


def clamp_box(x: float, y: float, w: float, h: float, width: int, height: int) -> BoxGeometry:
    """Clamp a box to the image ``[0, width] x [0, height]``; refuse empty or non-finite boxes.

    Negative sizes are normalised (a box dragged up/left). Raises
    :class:`InvalidBoxError` when the clamped box has zero area.
    """
    vals = [float(v) for v in (x, y, w, h)]
    if not all(math.isfinite(v) for v in vals):
        raise InvalidBoxError(f"box coordinates must be finite numbers, got {vals}")
    x, y, w, h = vals
    if w < 0:
        x, w = x + w, -w
    if h < 0:
        y, h = y + h, -h
    x, w = _clamp_span(x, w, float(width))
    y, h = _clamp_span(y, h, float(height))
    if w <= 0.0 or h <= 0.0:
        raise InvalidBoxError(
            f"box ({vals[0]:g}, {vals[1]:g}, {vals[2]:g} x {vals[3]:g}) has zero area inside the "
            f"{width} x {height} image; draw a box with a width and height")
    return BoxGeometry(x, y, w, h)


def _clamp_span(start: float, size: float, limit: float) -> tuple[float, float]:
    """Clamp ``[start, start + size]`` to ``[0, limit]``; values inside are kept bit-exact."""
    if start >= 0.0 and start + size <= limit:
        return start, size
    lo = min(max(start, 0.0), limit)
    hi = min(max(start + size, 0.0), limit)
    return lo, hi - lo
