"""Pieces shared by the DICOM and raster readers: limits, format sniffing, windowing.

Nothing here decodes pixels; it only looks at the first bytes of a file and
turns already-decoded arrays into a :class:`~cxrviewer.core.study.Study`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError, StudyLoadError, UnsupportedFormatError
from ..study import Study, StudyMeta

#: Refuse images whose declared width x height exceeds this (checked before any
#: pixel buffer is allocated). 60 MP is well above any chest radiograph
#: (a 43 x 43 cm detector at 0.1 mm is 18.5 MP).
MAX_PIXELS = 60_000_000

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
RASTER_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff(path: Path) -> str:
    """Return ``"dicom"``, ``"dicom-raw"`` (no preamble), ``"png"``, ``"jpeg"`` or ``"tiff"``.

    The decision uses the file's content, not its name (a PNG named ``.dcm``
    is read as a PNG). Raises a :class:`StudyLoadError` subclass otherwise.
    """
    p = str(path)
    if not os.path.exists(p):
        raise StudyLoadError("file not found", path=p)
    if os.path.isdir(p):
        raise UnsupportedFormatError("is a folder, not an image file (open it as a worklist)", path=p)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise StudyLoadError(f"cannot be read ({exc.strerror or exc})", path=p) from exc
    if not head:
        raise CorruptFileError("the file is empty (0 bytes)", path=p)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if looks_like_raw_dicom(head):
        return "dicom-raw"
    suffix = Path(p).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        raise UnsupportedFormatError(
            "is named like a DICOM file but is not one (no 'DICM' marker and no DICOM data element at the start)",
            path=p)
    if suffix in RASTER_SUFFIXES:
        raise UnsupportedFormatError(f"is named {suffix} but its content is not a {suffix[1:].upper()} image", path=p)
    raise UnsupportedFormatError("is not a DICOM, PNG, JPEG or TIFF file", path=p)


def looks_like_raw_dicom(head: bytes) -> bool:
    """True when ``head`` starts like a DICOM data set written without preamble.

    Old ACR-NEMA style files and some exporters omit the 128-byte preamble and
    the ``DICM`` marker. We accept them only when the first element is a
    little-endian tag of group 0000, 0002 or 0008 with a small element number
    (the groups every such file starts with), which plain text never matches.
    """
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    elem = int.from_bytes(head[2:4], "little")
    return group in (0x0000, 0x0002, 0x0008) and elem < 0x0200


def check_pixel_count(rows: int, cols: int, path: str) -> None:
    """Refuse zero or absurd dimensions before anything is allocated."""
    if rows <= 0 or cols <= 0:
        raise CorruptFileError(f"declares an empty image ({rows} x {cols} pixels)", path=path)
    if rows * cols > MAX_PIXELS:
        from ..errors import ImageTooLargeError

        raise ImageTooLargeError(
            f"declares {cols} x {rows} pixels ({rows * cols / 1e6:.0f} MP); the limit is "
            f"{MAX_PIXELS / 1e6:.0f} MP", path=path)


def percentile_window(modality: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """A (centre, width) window covering the central percentiles of the data.

    Computed on a strided subsample (at most ~1 M values) so it costs
    milliseconds even for large images.
    """
    step = max(1, int(math.sqrt(modality.size / 1_000_000)))
    sample = modality[::step, ::step]
    lo, hi = np.percentile(sample, [lo_pct, hi_pct])
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.5, 1.0
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def build_study(stored: np.ndarray, modality: np.ndarray, window: tuple[float, float],
                invert: bool, meta: StudyMeta) -> Study:
    """Assemble a :class:`Study`; ``model_input`` = windowed modality, inverted for MONOCHROME1.

    The model input uses the header's display window (the rendering the
    acquiring site intended, which is also how the NIH PNGs were exported from
    DICOM), mapped to [0, 1] with dense tissue bright.
    """
    c, w = float(window[0]), float(window[1])
    lo = c - w / 2.0
    model_input = np.subtract(modality, np.float32(lo), dtype=np.float32)
    model_input *= np.float32(1.0 / w)
    np.clip(model_input, 0.0, 1.0, out=model_input)
    if invert:
        np.subtract(np.float32(1.0), model_input, out=model_input)
    return Study(stored=stored, modality=modality, model_input=model_input,
                 window=(c, w), invert_display=invert, meta=meta)
