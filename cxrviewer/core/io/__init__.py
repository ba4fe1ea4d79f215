"""Study loading: DICOM, PNG/JPEG/TIFF and NIH ChestX-ray14 folders.

Public API::

    load_study(path, *, timeout=30.0) -> Study        # one file, format sniffed from its bytes
    open_worklist(paths) -> Worklist                 # files, folders (recursive), NIH folders
    is_nih_folder(path) -> bool
    read_nih_folder(path) -> Worklist

Every failure is a :class:`~cxrviewer.core.errors.StudyLoadError` subclass with
a message naming the file; nothing else escapes ``load_study``. Files are only
ever opened for reading.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import CorruptFileError, CxrError
from ..study import Study
from ._common import (DICOM_SUFFIXES, MAX_PIXELS, RASTER_SUFFIXES, looks_like_raw_dicom, missing_reason, one_line,
                      safe_text, sniff)
from .nih import is_nih_folder, read_nih_folder
from .worklist import StudyRef, Worklist

__all__ = [
    "MAX_PIXELS",
    "StudyRef",
    "Worklist",
    "is_nih_folder",
    "load_study",
    "open_worklist",
    "read_nih_folder",
]

log = logging.getLogger(__name__)


def load_study(path: str | Path, *, timeout: float = 30.0) -> Study:
    """Decode one study file into a :class:`Study`.

    The format is decided from the file's first bytes (``DICM`` preamble, PNG,
    JPEG or TIFF signatures; DICOM written without preamble is accepted when it
    starts with a group 0000/0002/0008 element). ``timeout`` bounds the
    child-process decode of compressed DICOM pixel data.
    Raises :class:`~cxrviewer.core.errors.StudyLoadError` subclasses only.
    """
    p = os.fspath(path)
    try:
        fmt = sniff(Path(p))
        if fmt in ("dicom", "dicom-raw"):
            from .dicom import load_dicom

            return load_dicom(p, timeout=timeout, raw=fmt == "dicom-raw")
        from .raster import load_raster

        return load_raster(p, fmt)
    except CxrError:
        raise
    except MemoryError:
        from ..errors import ImageTooLargeError

        raise ImageTooLargeError("not enough memory to load this image", path=p) from None
    except Exception as exc:  # noqa: BLE001 - the contract is: typed errors only
        log.debug("unexpected error loading %s", p, exc_info=True)
        raise CorruptFileError(f"could not be loaded ({type(exc).__name__}: {exc})", path=p) from None


def _is_study_file(path: str, name: str) -> bool:
    """Extension match, or an extension-less file with a DICOM preamble."""
    low = name.lower()
    ext = os.path.splitext(low)[1]
    if ext in RASTER_SUFFIXES or ext in DICOM_SUFFIXES:
        return True
    if ext:
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block open() forever
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or looks_like_raw_dicom(head)


def _scan_folder(root: Path, wl: Worklist) -> None:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: wl.errors.append(one_line(e))):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if _is_study_file(full, name):
                found.append(full)
    for full in found:
        rel = os.path.relpath(full, root)
        wl.refs.append(StudyRef(path=Path(full), key=os.path.abspath(full), display_name=rel))


def open_worklist(paths: Sequence[str | Path]) -> Worklist:
    """Expand files, folders and NIH ChestX-ray14 folders into one :class:`Worklist`.

    Folders are scanned recursively for .dcm/.dicom, .png/.jpg/.jpeg/.tif/.tiff
    and extension-less DICOM files; an NIH folder (``images/`` + label csv)
    becomes labelled refs. Nothing is decoded. Problems (missing paths, an
    unreadable NIH label file) are collected in ``Worklist.errors``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    wl = Worklist(source=", ".join(os.fspath(p) for p in paths))
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        part = Worklist(source=str(p))
        try:
            if not p.exists():
                part.errors.append(f"{safe_text(p)}: {missing_reason(str(p))}")
            elif p.is_dir() and is_nih_folder(p):
                part = read_nih_folder(p)
            elif p.is_dir():
                _scan_folder(p, part)
                if not part.refs:
                    part.errors.append(f"{p}: no DICOM, PNG, JPEG or TIFF files found")
            else:
                part.refs.append(StudyRef(path=p, key=os.path.abspath(p), display_name=p.name))
        except (CxrError, OSError) as exc:
            part.errors.append(str(exc) if isinstance(exc, CxrError) else f"{safe_text(p)}: {one_line(exc)}")
        for ref in part.refs:
            k = os.path.abspath(ref.path)
            if k in seen:
                continue
            seen.add(k)
            wl.refs.append(ref)
        wl.errors.extend(part.errors)
    return wl
