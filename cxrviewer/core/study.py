"""The :class:`Study`: one frontal chest radiograph as cxrviewer holds it.

A study keeps three views of the same pixels:

``stored``
    the decoded stored values exactly as in the file (integer dtype for DICOM,
    uint8/uint16 for rasters); ``pixel_sha256`` hashes these.
``modality``
    float32 values after the Modality LUT (DICOM rescale slope/intercept; the
    identity for rasters). Window/level is expressed in these units.
``model_input``
    float32 in [0, 1], same height/width, dense tissue bright (MONOCHROME1
    already inverted), what preprocessing for a network starts from.

Display: map ``modality`` through ``window`` (centre, width) and invert when
``invert_display`` is true (MONOCHROME1), so lungs are dark.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .geometry import Box


@dataclass
class StudyMeta:
    """Metadata shown in the worklist and written by ``cxrviewer info``."""

    source_path: str
    format: str  # "dicom", "png", "jpeg", "tiff"
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_id: str | None = None
    view_position: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # (row, column) in mm
    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    manufacturer: str | None = None
    modality: str | None = None
    transfer_syntax: str | None = None
    number_of_frames: int = 1
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        d["warnings"] = list(self.warnings)
        return d


@dataclass
class Study:
    """One loaded image with its metadata and, for NIH folders, labels and boxes."""

    stored: np.ndarray
    modality: np.ndarray
    model_input: np.ndarray
    window: tuple[float, float]  # (centre, width) in modality units
    invert_display: bool
    meta: StudyMeta
    labels: dict[str, int] | None = None  # class -> 1 present / 0 absent (NIH folders)
    gt_boxes: list[Box] = field(default_factory=list)
    study_id: str = ""  # stable key used by worklists and caches
    #: display pyramid of ``modality`` ([full, /2, /4, ...]) built off the GUI thread; None until then
    display_pyramid: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stored.ndim != 2:
            raise ValueError("Study.stored must be 2-D")
        if self.modality.shape != self.stored.shape or self.model_input.shape != self.stored.shape:
            raise ValueError("Study arrays must share one shape")
        if not self.study_id:
            self.study_id = self.meta.sop_uid or self.pixel_sha256()[:16]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.stored.shape[0]), int(self.stored.shape[1]))

    def pixel_sha256(self) -> str:
        """SHA-256 of the decoded stored values as little-endian bytes (C order)."""
        arr = np.ascontiguousarray(self.stored)
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return hashlib.sha256(arr.tobytes()).hexdigest()

    def display_image(self, window: tuple[float, float] | None = None,
                      invert: bool | None = None) -> np.ndarray:
        """Float32 image in [0, 1] after window/level and optional inversion.

        This is a convenience for exports and tests; the GUI hands ``modality``
        and levels straight to pyqtgraph instead.
        """
        c, w = window if window is not None else self.window
        w = max(float(w), 1e-6)
        lo = c - w / 2.0
        img = np.clip((self.modality - lo) / w, 0.0, 1.0).astype(np.float32)
        inv = self.invert_display if invert is None else invert
        return 1.0 - img if inv else img
