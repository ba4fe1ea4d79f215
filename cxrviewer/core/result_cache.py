"""Where results for a study are found again: the results cache, files beside the study, and
``cxrviewer analyze`` output folders opened as a worklist.

Every reader here checks the pixel hash, so a results file is only ever shown over the image
it was computed from; a results file's ``source_path`` becomes a worklist row only when it names
an image file the app reads (see :func:`_untrusted_source`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CxrError
from . import io as cio
from .io._common import sniff
from .io.results import read_results, results_summary
from .io.worklist import StudyRef, Worklist
from .results import Results

log = logging.getLogger(__name__)

__all__ = ["CACHE_SHA_DIGITS", "RESULTS_SUFFIXES", "cache_path", "cache_sha_prefix", "expand_paths", "read_matching",
           "sidecar_candidates"]

RESULTS_SUFFIXES = (".h5", ".hdf5")
_IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


#: how many hex digits of the pixels' hash begin a cache file's name (:func:`cache_path`)
CACHE_SHA_DIGITS = 32
_CACHE_NAME = re.compile(rf"^([0-9a-f]{{{CACHE_SHA_DIGITS}}})-.+\.h5$")


def cache_path(sha: str, key: str, folder: Path) -> Path:
    """The cache file of the pixels ``sha`` analysed with the model set ``key``."""
    return folder / f"{sha[:CACHE_SHA_DIGITS]}-{key}.h5"


def cache_sha_prefix(name: str) -> str | None:
    """The hash prefix a cache file named ``name`` carries (:func:`cache_path`); None for any other name."""
    m = _CACHE_NAME.match(name)
    return m.group(1) if m else None


def sidecar_candidates(study_path: str | os.PathLike) -> list[Path]:
    """Where an offline results file for a study may sit beside it."""
    p = Path(study_path)
    return [p.with_name(p.name + ".results.h5"), p.with_name(p.stem + ".results.h5"),
            p.parent / p.stem / "results.h5", p.parent / "results.h5"]


def read_matching(path: Path, sha: str) -> Results | None:
    """Results from ``path`` when it exists and belongs to the pixels ``sha``; else None."""
    if not path.is_file():
        return None
    try:
        if results_summary(path)["pixel_sha256"] != sha:
            return None
        return read_results(path)
    except CxrError as exc:
        log.warning("ignoring results file %s: %s", path, exc)
        return None


def _untrusted_source(src: Path) -> str | None:
    """Why ``src`` (a results file's ``source_path``) must not become a worklist row, or None.

    Only a regular file whose first bytes are an image format the app reads (DICOM, PNG, JPEG,
    TIFF, by content, not name) is trusted; ``/etc/passwd``, devices, FIFOs and folders are not.
    Whether the image is the one the results were computed from is checked when it is opened
    (:func:`read_matching` compares the pixel hash), so a row never shows another image's maps.
    """
    try:
        st = os.stat(src)
    except (OSError, ValueError):
        return "is not found"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    try:
        sniff(src)
    except CxrError:
        return "is not an image file cxrviewer reads"
    return None


def _has_images(folder: Path) -> bool:
    return (folder / "images").is_dir() or any(
        f.suffix.lower() in _IMAGE_SUFFIXES for f in folder.iterdir() if f.is_file())


def _results_row(h5: Path, wl: Worklist) -> None:
    try:
        info = results_summary(h5)
    except CxrError as exc:
        wl.errors.append(f"{h5}: {exc}")
        return
    src = Path(info["source_path"])
    why = _untrusted_source(src)
    if why:
        wl.errors.append(f"{h5}: its study {str(src)!r} {why}")
        return
    extra = {"results": str(h5)}
    probs = info["probabilities"]
    if probs is not None and len(info["classes"]) == len(probs):
        top = np.argsort(-probs, kind="stable")[:3]
        extra["findings"] = json.dumps([[info["classes"][i], float(probs[i])] for i in top])
    wl.refs.append(StudyRef(path=src, key=f"{os.path.abspath(src)}", display_name=src.name, extra=extra))


def expand_paths(paths: Sequence[str | os.PathLike]) -> Worklist:
    """``open_worklist`` plus HDF5 results files (``cxrviewer analyze`` output).

    A results file (or a folder holding ``*/results.h5``) becomes a worklist row for its
    source image with ``extra["results"]`` pointing at the file.
    """
    plain: list[str] = []
    h5s: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() in RESULTS_SUFFIXES:
            h5s.append(p)
        elif p.is_dir() and not _has_images(p) and list(p.glob("*/results.h5")):
            h5s.extend(sorted(p.glob("*/results.h5")))  # a `cxrviewer analyze --out` folder
        else:
            plain.append(str(raw))
    wl = cio.open_worklist(plain) if plain else Worklist(source=", ".join(map(str, paths)))
    for h5 in h5s:
        _results_row(h5, wl)
    if h5s and not wl.source:
        wl.source = ", ".join(map(str, paths))
    return wl
