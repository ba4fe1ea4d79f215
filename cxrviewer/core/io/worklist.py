"""Worklists: what a path the user opened expands to, before any pixel is decoded.

A :class:`StudyRef` is cheap (a path plus the labels/boxes an NIH folder gives);
``StudyRef.load()`` decodes it into a :class:`~cxrviewer.core.study.Study`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..geometry import Box


@dataclass
class StudyRef:
    """A study not yet decoded: where it is and what a label file says of it."""

    path: Path
    key: str  # stable id within the worklist (NIH "Image Index" stem, or the file path)
    display_name: str
    labels: dict[str, int] | None = None  # canonical class -> 1/0 (NIH folders only)
    gt_boxes: list[Box] = field(default_factory=list)
    patient_id: str | None = None
    view_position: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # e.g. age, sex, follow-up
    #: notes found while scanning (dropped boxes, unknown labels); added to the Study's warnings
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from ._common import safe_text

        self.display_name = safe_text(self.display_name)  # file names: no control/bidi characters

    def load(self, *, timeout: float = 30.0):
        """Decode the file; labels and ground-truth boxes are attached to the Study."""
        from . import load_study

        study = load_study(self.path, timeout=timeout)
        if self.labels is not None:
            study.labels = dict(self.labels)
        if self.gt_boxes:
            study.gt_boxes = self._boxes_for(study.shape)
        study.meta.warnings.extend(w for w in self.warnings if w not in study.meta.warnings)
        if self.patient_id and not study.meta.patient_id:
            study.meta.patient_id = self.patient_id
        if self.view_position and not study.meta.view_position:
            study.meta.view_position = self.view_position
        return study

    def _boxes_for(self, shape: tuple[int, int]) -> list[Box]:
        """Ground-truth boxes scaled from their frame (``extra["box_frame"]``) to an image of ``shape``."""
        boxes = list(self.gt_boxes)
        raw = self.extra.get("box_frame")  # NIH boxes live in a 1024 x 1024 frame
        if not raw:
            return boxes
        try:
            frame = int(raw)
        except (TypeError, ValueError):
            frame = 0
        if not 1 <= frame <= 65_536:
            from ..errors import CorruptFileError

            raise CorruptFileError(f"box frame {str(raw)[:20]!r} is not a positive image size", path=str(self.path))
        if shape != (frame, frame):
            h, w = shape
            boxes = [b.scaled(w / frame, h / frame) for b in boxes]
        return boxes


@dataclass
class Worklist:
    """An ordered list of study references with where they came from."""

    refs: list[StudyRef] = field(default_factory=list)
    source: str = ""
    errors: list[str] = field(default_factory=list)  # per-entry problems found while scanning

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self):
        return iter(self.refs)

    def __getitem__(self, i: int) -> StudyRef:
        return self.refs[i]

    def extend(self, other: "Worklist") -> None:
        self.refs.extend(other.refs)
        self.errors.extend(other.errors)
