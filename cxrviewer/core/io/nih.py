"""NIH ChestX-ray14 folders: ``images/`` + ``Data_Entry_2017*.csv[.gz]`` (+ ``BBox_List_2017.csv[.gz]``).

Images are matched to label rows by file *stem* (the label file says
``00000001_000.png``; a folder of re-encoded ``.jpg`` copies still matches).
Only rows whose image exists become :class:`StudyRef` s. Labels are the 14
classes of :mod:`cxrviewer.core.classes` (``No Finding`` = all zero); boxes
come from the bounding-box file with aliases such as ``Infiltrate`` mapped to
``Infiltration``. Box coordinates are in the 1024 x 1024 pixel frame of the
released PNGs; ``StudyRef.extra["box_frame"]`` records that.

Speed: the full label file has 112,120 rows; it is parsed with the ``csv``
module in one pass, and the images folder is indexed with one ``os.scandir``
(see ``benchmarks/io_nih_worklist.py``).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

from ..classes import CLASSES, NO_FINDING, canonical
from ..errors import CorruptFileError, StudyLoadError
from ..geometry import Box
from ._common import bounded_lines, safe_text
from .worklist import StudyRef, Worklist

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")
#: Pixel frame of the official boxes (the released PNGs are 1024 x 1024).
BOX_FRAME = 1024
#: Optional file in a folder stating its own box frame (one integer; synthetic phantoms write it).
BOX_FRAME_FILE = "box_frame.txt"


#: Largest box frame accepted from ``box_frame.txt`` (pixels per side).
MAX_BOX_FRAME = 65_536


def _box_frame(root: Path) -> int:
    """The folder's box frame: ``box_frame.txt`` (one integer 1..65536) or :data:`BOX_FRAME`.

    A present but unusable file (0, negative, NaN, text, huge) raises
    :class:`CorruptFileError`: boxes scaled by a wrong frame would be silently wrong.
    """
    fp = root / BOX_FRAME_FILE
    try:
        with open(fp, "rb") as f:
            raw = f.read(65)
    except FileNotFoundError:
        return BOX_FRAME
    except OSError as exc:
        raise CorruptFileError(f"{BOX_FRAME_FILE} cannot be read ({exc.strerror or exc})", path=str(root)) from None
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > 64 or not text.isdigit() or not text.isascii() or not 1 <= int(text) <= MAX_BOX_FRAME:
        raise CorruptFileError(f"{BOX_FRAME_FILE} must hold one whole number of pixels from 1 to {MAX_BOX_FRAME} "
                               f"(found {safe_text(text[:20])!r})", path=str(root))
    return int(text)


def _find(folder: Path, prefix: str) -> Path | None:
    """Newest-named ``prefix*.csv`` or ``prefix*.csv.gz`` in ``folder`` (v2020 beats the original)."""
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return None
    hits = sorted(n for n in names if n.startswith(prefix) and (n.endswith(".csv") or n.endswith(".csv.gz")))
    return folder / hits[-1] if hits else None


def is_nih_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder with ``images/`` and a ``Data_Entry_2017*.csv[.gz]`` label file."""
    p = Path(path)
    return p.is_dir() and (p / "images").is_dir() and _find(p, "Data_Entry_2017") is not None


def _open_text(path: Path):
    """csv rows of ``path`` read through the bounded line reader (see :func:`bounded_lines`)."""
    return csv.reader(bounded_lines(path))


def _stem(name: str) -> str:
    name = name.strip()
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


def _index_images(images: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    with os.scandir(images) as it:
        for e in it:
            name = e.name
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                out.setdefault(_stem(name), Path(e.path))
    return out


def _col(header: list[str], *names: str) -> int | None:
    norm = [h.strip().lower() for h in header]
    for n in names:
        n = n.lower()
        for i, h in enumerate(norm):
            if h == n or h.startswith(n):
                return i
    return None


def _check_box(box: Box, frame: int) -> tuple[Box | None, str | None]:
    """``(box, None)`` when usable, ``(clipped, note)`` when it crosses the frame edge, ``(None, note)`` when refused.

    Refused: a non-finite coordinate, a width or height <= 0, or no overlap with
    the ``frame`` x ``frame`` image. Clipped: partly outside the image.
    """
    vals = (box.x, box.y, box.w, box.h)
    if not all(math.isfinite(v) for v in vals):
        return None, "has a non-finite coordinate"
    if box.w <= 0 or box.h <= 0:
        return None, f"has a size of {box.w:g} x {box.h:g}"
    x1, y1 = max(box.x, 0.0), max(box.y, 0.0)
    x2, y2 = min(box.x2, float(frame)), min(box.y2, float(frame))
    if x2 <= x1 or y2 <= y1:
        return None, f"lies outside the {frame} x {frame} image"
    if (x1, y1, x2, y2) == (box.x, box.y, box.x2, box.y2):
        return box, None
    return Box(box.label, x1, y1, x2 - x1, y2 - y1), f"crosses the edge of the {frame} x {frame} image (clipped)"


def _read_boxes(path: Path, wanted: dict[str, Path], frame: int, errors: list[str],
                notes: dict[str, list[str]]) -> dict[str, list[Box]]:
    """Boxes by image stem; the header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``.

    Unusable boxes are dropped (or clipped) with a note in ``errors`` and in
    ``notes[stem]`` (which becomes the study's warnings).
    """
    boxes: dict[str, list[Box]] = {}
    name = safe_text(path.name)
    rows = _open_text(path)
    header = next(rows, None)
    if not header:
        errors.append(f"{name}: empty box file")
        return boxes
    i_img = _col(header, "Image Index") or 0
    i_lab = _col(header, "Finding Label")
    i_box = _col(header, "Bbox")
    i_lab = 1 if i_lab is None else i_lab
    i_box = 2 if i_box is None else i_box
    for n, row in enumerate(rows, start=2):
        if len(row) < i_box + 4:
            if row:
                errors.append(f"{name} line {n}: too few columns")
            continue
        stem = _stem(row[i_img])
        if stem not in wanted:
            continue
        try:
            label = canonical(row[i_lab])
            x, y, w, h = (float(v) for v in row[i_box:i_box + 4])
        except (KeyError, ValueError):
            msg = f"{name} line {n}: unreadable box {safe_text(row, 200)} dropped (unknown label or not numbers)"
            errors.append(msg)
            notes.setdefault(stem, []).append(msg)
            continue
        box, why = _check_box(Box(label, x, y, w, h), frame)
        if why:
            msg = f"{name} line {n}: {label} box {safe_text(row[i_box:i_box + 4])} {why}" + \
                ("" if box else "; dropped")
            errors.append(f"{safe_text(stem)}: {msg}")
            notes.setdefault(stem, []).append(msg)
        if box is not None:
            boxes.setdefault(stem, []).append(box)
    return boxes


def _labels(cell: str, notes: list[str]) -> dict[str, int]:
    """Class -> 0/1 from a ``Finding Labels`` cell; unknown names are noted, not guessed."""
    labels = dict.fromkeys(CLASSES, 0)
    for name in cell.split("|"):
        name = name.strip()
        if not name or name == NO_FINDING:
            continue
        try:
            labels[canonical(name)] = 1
        except KeyError:
            notes.append(f"unknown finding label {safe_text(name, 80)!r} ignored")
    return labels


def _ref(row: list[str], cols: dict[str, int | None], stem: str, img: Path, frame: int,
         boxes: list[Box], notes: list[str]) -> StudyRef:
    """One labelled :class:`StudyRef` from a label-file row."""
    labels = _labels(row[cols["img_lab"]], notes)
    extra = {"box_frame": str(frame)}
    for key in ("age", "sex", "follow_up"):
        if cols[key] is not None:
            extra[key] = safe_text(row[cols[key]].strip(), 80)
    pid, view = cols["pid"], cols["view"]
    return StudyRef(
        path=img, key=stem, display_name=safe_text(stem), labels=labels, gt_boxes=boxes,
        patient_id=safe_text(row[pid].strip(), 80) if pid is not None else None,
        view_position=safe_text(row[view].strip(), 20) if view is not None else None,
        extra=extra, warnings=notes)


def _read_labels(label_file: Path, images: dict[str, Path], frame: int, boxes: dict[str, list[Box]],
                 notes: dict[str, list[str]], wl: Worklist) -> None:
    """Append a ref to ``wl`` for every label row whose image exists."""
    name = safe_text(label_file.name)
    rows = _open_text(label_file)
    header = next(rows, None)
    if not header:
        raise CorruptFileError("the label file is empty", path=str(label_file))
    cols = {"img": _col(header, "Image Index"), "img_lab": _col(header, "Finding Labels"),
            "follow_up": _col(header, "Follow-up"), "pid": _col(header, "Patient ID"),
            "age": _col(header, "Patient Age"), "sex": _col(header, "Patient Gender", "Patient Sex"),
            "view": _col(header, "View Position")}
    if cols["img"] is None or cols["img_lab"] is None:
        raise CorruptFileError("the label file has no 'Image Index'/'Finding Labels' columns",
                               path=str(label_file))
    width = max(i for i in cols.values() if i is not None) + 1
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        if len(row) < width:
            if row:
                wl.errors.append(f"{name} line {n}: too few columns")
            continue
        stem = _stem(row[cols["img"]])
        img = images.get(stem)
        if img is None or stem in seen:
            continue
        seen.add(stem)
        ref_notes = notes.get(stem, [])
        before = len(ref_notes)
        wl.refs.append(_ref(row, cols, stem, img, frame, boxes.get(stem, []), ref_notes))
        wl.errors.extend(f"{safe_text(stem)}: {m}" for m in ref_notes[before:])


def read_nih_folder(path: str | Path) -> Worklist:
    """Worklist of an NIH ChestX-ray14 folder: labelled refs for every label row whose image exists.

    The csv files are read through :func:`~cxrviewer.core.io._common.bounded_lines`
    (size, line-length and line-count ceilings); a bad ``box_frame.txt`` or label
    file raises :class:`CorruptFileError`. Unusable boxes and unknown labels are
    dropped with a note in ``Worklist.errors`` and in the ref's ``warnings``.
    """
    root = Path(path)
    label_file = _find(root, "Data_Entry_2017")
    if not (root / "images").is_dir() or label_file is None:
        raise StudyLoadError("is not an NIH ChestX-ray14 folder (needs images/ and Data_Entry_2017*.csv)",
                             path=str(root))
    frame = _box_frame(root)
    wl = Worklist(source=str(root))
    notes: dict[str, list[str]] = {}
    try:
        images = _index_images(root / "images")
        box_file = _find(root, "BBox_List_2017")
        boxes = _read_boxes(box_file, images, frame, wl.errors, notes) if box_file else {}
        _read_labels(label_file, images, frame, boxes, notes, wl)
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"the NIH label files cannot be read ({safe_text(exc)})", path=str(root)) from None
    missing = len(images) - len(wl.refs)
    if missing > 0:
        wl.errors.append(f"{missing} image(s) in images/ have no row in {safe_text(label_file.name)} and were skipped")
    log.info("NIH folder %s: %d labelled images of %d files", root, len(wl.refs), len(images))
    return wl
