"""Pieces shared by the DICOM and raster readers: limits, format sniffing, windowing.

Nothing here decodes pixels; it only looks at the first bytes of a file and
turns already-decoded arrays into a :class:`~cxrviewer.core.study.Study`.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import math
import os
import stat
import threading
import warnings
import zlib
from collections.abc import Iterator
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
        reason = missing_reason(p)
        raise StudyLoadError("file not found" if reason == "not found" else reason, path=p)
    if os.path.isdir(p):
        raise UnsupportedFormatError("is a folder, not an image file (open it as a worklist)", path=p)
    try:
        regular = stat.S_ISREG(os.stat(p).st_mode)
    except OSError as exc:
        raise StudyLoadError(f"cannot be read ({exc.strerror or exc})", path=p) from None
    if not regular:  # a FIFO would block open() forever; a device can be endless
        raise UnsupportedFormatError("is not a regular file (a pipe, socket or device)", path=p)
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


# --------------------------------------------------------------------------- budgets for text inputs
#: Decompressed size ceiling of one NIH label/box csv (the full v2020 label file is ~8 MB).
MAX_CSV_BYTES = 64 * 2**20
#: Longest csv line accepted (a real row is under 200 bytes).
MAX_CSV_LINE = 64 * 1024
#: Most lines read from one csv (the full label file has 112,121).
MAX_CSV_LINES = 1_000_000
_CHUNK = 64 * 1024


def safe_text(text: object, limit: int = 512) -> str:
    """``text`` with control and bidi/format characters escaped, cut to ``limit`` characters.

    Used wherever a file name or a header value becomes a study id, a display
    name or a notice: ``\\n``, ``\\x1b`` or U+202E (right-to-left override)
    cannot reflow a message or disguise a name (they become ``\\x0a``, ``\\u202e``).
    """
    s = str(text)
    if s.isprintable() and len(s) <= limit:
        return s
    out = []
    for ch in s:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    s = "".join(out)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def one_line(text: object, limit: int = 300) -> str:
    """A warning as one line: whitespace runs (newlines included) collapsed, then :func:`safe_text`."""
    return safe_text(" ".join(str(text).split()), limit)


def missing_reason(path: str) -> str:
    """Why ``path`` does not exist: a symbolic link loop, a broken link, no permission, or ``"not found"``."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (the link points back to itself)"
        if os.path.islink(path):
            return "is a broken symbolic link (its target does not exist)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "cannot be reached (permission denied)"
        if exc.errno == errno.ENAMETOOLONG:
            return "has a name that is too long"
    return "not found"


def bounded_lines(path: Path, *, max_bytes: int = MAX_CSV_BYTES, max_line: int = MAX_CSV_LINE,
                  max_lines: int = MAX_CSV_LINES) -> Iterator[str]:
    """Lines (with their ending) of a utf-8 text file, gunzipped in bounded steps if it ends in ``.gz``.

    Never holds more than one line plus a 64 KiB chunk: a line longer than
    ``max_line``, more than ``max_bytes`` (decompressed) or more than
    ``max_lines`` lines raise :class:`CorruptFileError` as soon as they are
    reached, so a gzip bomb costs milliseconds. Undecodable bytes raise it too.
    """
    name = safe_text(path.name)
    opener = gzip.open if path.name.endswith(".gz") else open
    total = lines = 0
    pending = b""
    try:
        with opener(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                total += len(chunk)
                if total > max_bytes:
                    raise CorruptFileError(f"{name} is larger than {max_bytes >> 20} MiB once "
                                           "decompressed; refused", path=str(path.parent))
                if chunk:
                    parts = (pending + chunk).split(b"\n")
                    pending = parts.pop()
                else:
                    parts, pending = ([pending] if pending else []), b""
                if len(pending) > max_line or any(len(raw) > max_line for raw in parts):
                    raise CorruptFileError(f"{name} has a line longer than {max_line // 1024} KiB; "
                                           "not a label file", path=str(path.parent))
                for raw in parts:
                    lines += 1
                    if lines > max_lines:
                        raise CorruptFileError(f"{name} has more than {max_lines} lines; refused",
                                               path=str(path.parent))
                    yield raw.decode("utf-8") + "\n"
                if not chunk:
                    return
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{name} is not utf-8 text ({exc.reason})", path=str(path.parent)) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFileError(f"{name} cannot be read ({exc})", path=str(path.parent)) from None


# --------------------------------------------------------------------------- library warnings
_CAPTURE_LOCK = threading.RLock()


class _ListHandler(logging.Handler):
    """Collects log records' messages (used for the ``pydicom`` logger while a file is read)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed log call must not break reading
            pass


@contextlib.contextmanager
def captured_warnings(into: list[str], logger_names: tuple[str, ...] = ("pydicom",)) -> Iterator[None]:
    """Route Python warnings and ``logger_names`` records raised inside the block into ``into``.

    Each message is added once, as one line (:func:`one_line`), so a library's
    multi-line warning about a hostile header never reaches stderr. Warning
    filters are process-wide, so blocks are serialised by a lock; a warning
    another thread raises meanwhile lands in this list rather than on stderr.
    """
    texts: list[str] = []
    handler = _ListHandler(texts)
    loggers = [logging.getLogger(n) for n in logger_names]
    with _CAPTURE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = [lg.propagate for lg in loggers]
        for lg in loggers:
            lg.addHandler(handler)
            lg.propagate = False
        try:
            yield
        finally:
            for lg, prop in zip(loggers, saved):
                lg.removeHandler(handler)
                lg.propagate = prop
            for msg in [str(w.message) for w in caught] + texts:
                line = one_line(msg)
                if line and line not in into:
                    into.append(line)
