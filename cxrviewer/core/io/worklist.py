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

    def load(self, *, timeout: float = 30.0):
        """Decode the file; labels and ground-truth boxes are attached to the Study."""
        from . import load_study

        study = load_study(self.path, timeout=timeout)
        if self.labels is not None:
            study.labels = dict(self.labels)
        if self.gt_boxes:
            boxes = list(self.gt_boxes)
            frame = self.extra.get("box_frame")  # NIH boxes live in a 1024 x 1024 frame
            if frame and study.shape != (int(frame), int(frame)):
                h, w = study.shape
                boxes = [b.scaled(w / int(frame), h / int(frame)) for b in boxes]
            study.gt_boxes = boxes
        if self.patient_id and not study.meta.patient_id:
            study.meta.patient_id = self.patient_id
        if self.view_position and not study.meta.view_position:
            study.meta.view_position = self.view_position
        return study


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
