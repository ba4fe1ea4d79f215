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
import gzip
import io
import logging
import os
from pathlib import Path

from ..classes import CLASSES, NO_FINDING, canonical
from ..errors import CorruptFileError, StudyLoadError
from ..geometry import Box
from .worklist import StudyRef, Worklist

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")
#: Pixel frame of the official boxes (the released PNGs are 1024 x 1024).
BOX_FRAME = 1024
#: Optional file in a folder stating its own box frame (one integer; synthetic phantoms write it).
BOX_FRAME_FILE = "box_frame.txt"


def _box_frame(root: Path) -> int:
    try:
        return int((root / BOX_FRAME_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return BOX_FRAME


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
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


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


def _read_boxes(path: Path, wanted: dict[str, Path], errors: list[str]) -> dict[str, list[Box]]:
    """Boxes by image stem; the header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``."""
    boxes: dict[str, list[Box]] = {}
    with _open_text(path) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            errors.append(f"{path.name}: empty box file")
            return boxes
        i_img = _col(header, "Image Index") or 0
        i_lab = _col(header, "Finding Label")
        i_box = _col(header, "Bbox")
        i_lab = 1 if i_lab is None else i_lab
        i_box = 2 if i_box is None else i_box
        for n, row in enumerate(rows, start=2):
            if len(row) < i_box + 4:
                if row:
                    errors.append(f"{path.name} line {n}: too few columns")
                continue
            stem = _stem(row[i_img])
            if stem not in wanted:
                continue
            try:
                label = canonical(row[i_lab])
                x, y, w, h = (float(v) for v in row[i_box:i_box + 4])
            except (KeyError, ValueError):
                errors.append(f"{path.name} line {n}: unreadable box {row!r}")
                continue
            boxes.setdefault(stem, []).append(Box(label, x, y, w, h))
    return boxes


def read_nih_folder(path: str | Path) -> Worklist:
    """Worklist of an NIH ChestX-ray14 folder: labelled refs for every label row whose image exists."""
    root = Path(path)
    label_file = _find(root, "Data_Entry_2017")
    if not (root / "images").is_dir() or label_file is None:
        raise StudyLoadError("is not an NIH ChestX-ray14 folder (needs images/ and Data_Entry_2017*.csv)",
                             path=str(root))
    images = _index_images(root / "images")
    frame = str(_box_frame(root))
    wl = Worklist(source=str(root))
    try:
        box_file = _find(root, "BBox_List_2017")
        boxes = _read_boxes(box_file, images, wl.errors) if box_file else {}
        refs = wl.refs
        class_set = set(CLASSES)
        with _open_text(label_file) as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                raise CorruptFileError("the label file is empty", path=str(label_file))
            i_img = _col(header, "Image Index")
            i_lab = _col(header, "Finding Labels")
            if i_img is None or i_lab is None:
                raise CorruptFileError("the label file has no 'Image Index'/'Finding Labels' columns",
                                       path=str(label_file))
            i_fu = _col(header, "Follow-up")
            i_pid = _col(header, "Patient ID")
            i_age = _col(header, "Patient Age")
            i_sex = _col(header, "Patient Gender", "Patient Sex")
            i_view = _col(header, "View Position")
            width = max(i for i in (i_img, i_lab, i_fu, i_pid, i_age, i_sex, i_view) if i is not None) + 1
            seen: set[str] = set()
            for n, row in enumerate(rows, start=2):
                if len(row) < width:
                    if row:
                        wl.errors.append(f"{label_file.name} line {n}: too few columns")
                    continue
                stem = _stem(row[i_img])
                img = images.get(stem)
                if img is None or stem in seen:
                    continue
                seen.add(stem)
                labels = dict.fromkeys(CLASSES, 0)
                for name in row[i_lab].split("|"):
                    name = name.strip()
                    if not name or name == NO_FINDING:
                        continue
                    try:
                        labels[canonical(name)] = 1
                    except KeyError:
                        if name not in class_set:
                            wl.errors.append(f"{stem}: unknown finding label {name!r} ignored")
                extra = {"box_frame": frame}
                if i_age is not None:
                    extra["age"] = row[i_age].strip()
                if i_sex is not None:
                    extra["sex"] = row[i_sex].strip()
                if i_fu is not None:
                    extra["follow_up"] = row[i_fu].strip()
                refs.append(StudyRef(
                    path=img, key=stem, display_name=stem, labels=labels,
                    gt_boxes=boxes.get(stem, []),
                    patient_id=row[i_pid].strip() if i_pid is not None else None,
                    view_position=row[i_view].strip() if i_view is not None else None,
                    extra=extra))
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"the NIH label files cannot be read ({exc})", path=str(root)) from None
    missing = len(images) - len(wl.refs)
    if missing > 0:
        wl.errors.append(f"{missing} image(s) in images/ have no row in {label_file.name} and were skipped")
    log.info("NIH folder %s: %d labelled images of %d files", root, len(wl.refs), len(images))
    return wl
