"""Exports (COCO, COCO results, Pascal VOC, YOLO, NIH ``BBox_List_2017.csv``) and imports (NIH
CSV, COCO).

Every file is written atomically: a temp file in the target's folder, fsync,
``os.replace`` over the target, fsync of the folder. A failing export raises
:class:`~cxrviewer.core.errors.ExportError` and leaves an existing target
untouched. A folder export (VOC, YOLO) is written whole into a temporary sibling folder and
renamed into place, so a killed export leaves no folder that looks complete; an existing
target folder (a previous export: only the files that format writes) is replaced only after
the new one is complete, and a folder holding other files is refused. Output file names are
sanitised (:func:`safe_stem`: no separators, control characters or reserved names, at most
:data:`MAX_STEM_BYTES` bytes, with a short hash of the original name when changed) and
unique. Exports carry no patient data: the store keeps none, and the SOP
Instance UID and the last-seen path (folders may carry a patient's name) are
written only with ``include_identifiers=True``. File names are base names.

Coordinates are original-image pixels, floats, top-left origin: COCO ``bbox`` is
``[x, y, w, h]`` (with ``area``, the rectangle as a ``segmentation`` polygon, and ``score``
on model boxes; ``coco-results`` writes the model proposals as a COCO results list); VOC
(VOCdevkit layout) ``bndbox`` is in 1-based integer pixels (:func:`voc_pixels`); YOLO
(Ultralytics layout, ``data.yaml``) is ``class cx cy w h`` normalised by the image size;
VOC and YOLO folders hold copies of the PNG/JPEG images; the NIH CSV is
``x, y, w, h`` with NIH class spellings ("Infiltrate"). Floats are written with
``repr`` (shortest exact), so COCO and NIH CSV round-trip bit-exactly.

Class names follow the project's label set (:attr:`AnnotationStore.label_set`): COCO
categories and YOLO class indices are its labels in its order. An import maps the file's
class names onto it by spelling and synonym (``mass`` -> ``Mass``, ``Infiltrate`` ->
``Infiltration``); names it cannot map refuse the whole import
(:class:`UnmappedClassesError`, listing them) unless ``mapping`` says where they go
(``{source name: project label}``, ``None`` to skip a name's rows) or ``add_unknown=True``
adds them to the project's label set (in the import's transaction).

Imports run in one transaction (nothing is written if any row is bad) and add
their boxes as one batch edit (a single undo step); studies are
matched by identity where the file carries one (``cxr_sop_uid``/``cxr_sha256``)
and otherwise created *unresolved* by file name, to be resolved the first time
the image is opened (:meth:`AnnotationStore.ensure_study`).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any

from ..classes import ALIASES
from ..errors import AnnotationStoreError, ExportError, UnmappedLabelsError
from ..labelsets import LabelSet, map_names, normalise
from .model import AnnotatedBox, Edit, LABEL_STATES, REVIEW_STATUSES, StudyIdentity, StudyRecord
from .store import AnnotationStore
from ..atomic import mkdtemp_beside, mkstemp_beside

log = logging.getLogger(__name__)

#: Header line of the NIH release's ``BBox_List_2017.csv`` (sic: 6 columns, 9 header cells).
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
#: NIH spellings that differ from the canonical class names.
NIH_NAMES: dict[str, str] = {"Infiltration": "Infiltrate"}
#: Size of the released NIH ChestX-ray14 PNGs (the CSV's boxes are in this space).
NIH_IMAGE_SIZE = (1024, 1024)


# ---- atomic writing ----------------------------------------------------------
def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        _fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[IO[bytes]], None] | bytes) -> Path:
    """Write ``target`` via a temp file in the same folder + fsync + ``os.replace``.

    ``write`` is the bytes or a callable filling a binary file object. On any
    error the temp file is removed, the target is left as it was and
    :class:`ExportError` is raised.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp_beside(target)
        with os.fdopen(fd, "wb") as fh:
            if isinstance(write, (bytes, bytearray)):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            _fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(folder)
    except (OSError, ValueError, TypeError, AnnotationStoreError) as exc:
        raise ExportError(f"could not write ({exc}); any existing file was left unchanged",
                          path=str(target)) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target


# ---- output file names ------------------------------------------------------------
#: Longest output file stem in UTF-8 bytes (file systems allow 255 for the whole name).
MAX_STEM_BYTES = 120
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*\u200e\u200f\u202a-\u202e\u2066-\u2069]')
_XML_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}


def _cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def safe_stem(name: str, limit: int = MAX_STEM_BYTES) -> str:
    """A file stem for ``name`` that is safe on common file systems; deterministic.

    Path separators, control and bidi characters and ``<>:"|?*`` become ``_``; leading or
    trailing dots/spaces go; Windows device names get a ``_`` prefix. A changed or too long
    stem keeps a readable prefix plus ``-`` and 10 hex digits of the original name's SHA-1.
    """
    clean = _UNSAFE.sub("_", name).strip(" .")
    stem = PurePath(clean).stem.strip(" .") if clean else ""
    if stem.split(".")[0].lower() in _RESERVED:
        stem = "_" + stem
    changed = clean != name
    if not stem:
        stem, changed = "study", True
    if changed or len(stem.encode("utf-8")) > limit:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        stem = f"{_cut_utf8(stem, limit - 11).rstrip(' .')}-{digest}"
    return stem


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold."""
    return _XML_BAD.sub("_", text)


# ---- collecting ------------------------------------------------------------------
@dataclass
class _Item:
    study: StudyRecord
    name: str  # unique output file name (the image's base name)
    labels: dict[str, str]
    boxes: list[AnnotatedBox]
    stem: str = ""  # unique, safe output file stem (VOC / YOLO file names)


def _collect(store: AnnotationStore, status: str | Iterable[str] | None,
             with_empty: bool = True) -> list[_Item]:
    items: list[_Item] = []
    used: set[str] = set()
    for rec in store.studies(status):
        boxes = store.boxes(rec.id)
        labels = store.labels(rec.id)
        if not with_empty and not boxes:
            continue
        name = PurePath(rec.identity.file_name).name or f"study_{rec.id}"
        if name.lower() in used:  # two different images with one file name
            p = PurePath(name)
            name = f"{p.stem}_{rec.id}{p.suffix}"
        used.add(name.lower())
        items.append(_Item(rec, name, labels, boxes))
    stems: set[str] = set()
    for it in items:  # unique ignoring case, as on Windows/macOS file systems
        stem = safe_stem(it.name)
        if stem.lower() in stems:
            stem = f"{_cut_utf8(stem, MAX_STEM_BYTES - 12)}_{it.study.id}"
        stems.add(stem.lower())
        it.stem = stem
    return items


def study_items(store: AnnotationStore, status: str | Iterable[str] | None = None, *,
                with_empty: bool = True) -> list[_Item]:
    """The studies an export writes (``status`` filter; ``with_empty=False``: only those with
    boxes), each with its unique output name and safe, unique file stem (``.stem``)."""
    return _collect(store, status, with_empty)


def _num(v: float) -> str:
    """Shortest exact decimal; integral values without ``.0`` (as in the NIH release)."""
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r


def _nih_name(label: str) -> str:
    return NIH_NAMES.get(label, label)


class UnmappedClassesError(ExportError, UnmappedLabelsError):
    """An import names classes the project's label set lacks and no mapping covers; nothing
    was written. ``unmapped``: the names (first-seen order); ``label_set``: the project's set."""


#: what the refusal of an import with unmapped classes says fixes it (the CLI's flags)
IMPORT_HINT = ("map them with --map NAME=LABEL (LABEL one of the project's labels), add them to "
               "the project's labels with --add-unknown, or leave their boxes out with --skip NAME")


def resolve_classes(store: AnnotationStore, names: Iterable[str], source: str | os.PathLike, *,
                    mapping: Mapping[str, str | None] | None = None,
                    add_unknown: bool = False) -> dict[str, str | None]:
    """Each of a file's class ``names`` -> the project's label (``None``: skipped).

    ``mapping``: ``{source name: project label}`` (``None`` or ``""``: skip that name),
    matched by normalised spelling and tried first; then the label set's spelling and
    synonyms. Unmapped names raise :class:`UnmappedClassesError` unless ``add_unknown``
    (then they are added to the project's label set: call this inside the import's batch).
    """
    names = list(dict.fromkeys(names))
    skip = {normalise(k) for k, v in (mapping or {}).items() if not v}
    explicit = {k: str(v) for k, v in (mapping or {}).items() if v}
    ls = store.label_set
    kept = [n for n in names if normalise(n) not in skip]
    found: dict[str, str | None] = dict(map_names(kept, ls, explicit)[0])
    unmapped = [n for n in kept if n not in found]
    if unmapped and add_unknown:
        ls = store.add_labels(unmapped)
        found.update({n: ls.canonical(n) for n in unmapped})
    elif unmapped:
        shown = ", ".join(repr(u) for u in unmapped[:20]) + (
            f" (and {len(unmapped) - 20} more)" if len(unmapped) > 20 else "")
        raise UnmappedClassesError(
            f"{len(unmapped)} class{'es' if len(unmapped) > 1 else ''} not in the project's label "
            f"set {ls.display_name}: {shown}; {IMPORT_HINT}. Nothing was imported",
            unmapped, ls.name, path=str(source))
    found.update({n: None for n in names if normalise(n) in skip})
    return found


def _label_index(ls: LabelSet, items: Iterable["_Item"], target: str | os.PathLike) -> dict[str, int]:
    """Each stored label's index in the project's label set; a label outside it (a store
    written by hand) refuses the export."""
    used = {lab for it in items for lab in [*(b.label for b in it.boxes), *it.labels]}
    index, bad = {}, []
    for lab in sorted(used):
        try:
            index[lab] = ls.index(lab)
        except KeyError:
            bad.append(lab)
    if bad:
        raise ExportError(f"the project holds classes outside its label set {ls.display_name}: "
                          f"{', '.join(map(repr, bad))}; add them with 'cxrviewer annotations "
                          "add-labels'. Nothing was written", path=str(target))
    return index


# ---- COCO ------------------------------------------------------------------------
def box_polygon(x: float, y: float, w: float, h: float) -> list[float]:
    """A box as a COCO polygon: its 4 corners clockwise from the top left, ``[x0, y0, ...]``."""
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def coco_dict(store: AnnotationStore, *, include_identifiers: bool = False,
              status: str | Iterable[str] | None = None) -> dict:
    """The store as a COCO detection dict (categories 1..N: the project's label set, in order)."""
    from .model import utc_now

    images, anns = [], []
    ls = store.label_set
    items = _collect(store, status)
    index = _label_index(ls, items, store.path)
    for it in items:
        rec = it.study
        img: dict[str, Any] = {"id": rec.id, "file_name": it.name, "width": rec.width,
                               "height": rec.height, "cxr_status": rec.status,
                               "cxr_labels": dict(sorted(it.labels.items()))}
        if rec.identity.sha256:
            img["cxr_sha256"] = rec.identity.sha256
        if include_identifiers:
            img["cxr_sop_uid"] = rec.identity.sop_uid
            img["cxr_path"] = rec.path
        images.append(img)
        for b in it.boxes:
            ann = {"id": b.id, "image_id": rec.id, "category_id": index[b.label] + 1,
                   "bbox": [b.x, b.y, b.w, b.h], "area": b.w * b.h, "iscrowd": 0,
                   "segmentation": [box_polygon(b.x, b.y, b.w, b.h)],
                   "cxr_source": b.source, "cxr_model": b.model_name, "cxr_score": b.score,
                   "cxr_annotator": b.annotator, "cxr_created": b.created,
                   "cxr_modified": b.modified}
            if b.score is not None:
                ann["score"] = b.score
            anns.append(ann)
    return {
        "info": {"description": "cxrviewer annotations", "version": "1.0",
                 "date_created": utc_now()},
        "licenses": [],
        "categories": [{"id": i + 1, "name": c, "supercategory": "finding"}
                       for i, c in enumerate(ls.labels)],
        "cxr_label_set": ls.to_json(),
        "images": images,
        "annotations": anns,
    }


def export_coco(store: AnnotationStore, target: str | os.PathLike, *,
                include_identifiers: bool = False,
                status: str | Iterable[str] | None = None) -> Path:
    """Write a COCO JSON file (atomically)."""
    data = coco_dict(store, include_identifiers=include_identifiers, status=status)
    return atomic_write(target, json.dumps(data, indent=1).encode("utf-8"))


def coco_results(store: AnnotationStore, *, status: str | Iterable[str] | None = None,
                 model: str | None = None) -> list[dict]:
    """The model's detections as a COCO *results* list (``COCO.loadRes``):
    ``[{"image_id", "category_id", "bbox", "score"}]``, ids as in :func:`coco_dict`.

    Detections: every proposal (pending, accepted or rejected: the model's own box and score)
    plus model boxes that came without a proposal (e.g. imported), of classes in the label
    set and with a score. ``model``: only that model's; required when there are several.
    Raises :class:`ExportError` when there is nothing to write or the models are mixed.
    """
    ls = store.label_set
    found: list[tuple[str, dict]] = []
    for it in _collect(store, status):
        sid = it.study.id
        dets = [(p.model_name, p.label, p.x, p.y, p.w, p.h, p.score) for p in store.proposals(sid)]
        dets += [(b.model_name or "", b.label, b.x, b.y, b.w, b.h, b.score) for b in it.boxes
                 if b.source == "model" and b.proposal_id is None]
        found += [(name, {"image_id": sid, "category_id": ls.index(label) + 1,
                          "bbox": [x, y, w, h], "score": float(score)})
                  for name, label, x, y, w, h, score in dets
                  if score is not None and label in ls and model in (None, name)]
    models = sorted({name for name, _ in found})
    if len(models) > 1:
        raise ExportError(f"the project holds the proposals of {len(models)} models "
                          f"({', '.join(models)}); a results file is one model's: choose one "
                          "(--model NAME)", path=str(store.path))
    if not found:
        raise ExportError("no model proposals with a score" + (f" of {model!r}" if model else "")
                          + "; nothing was written", path=str(store.path))
    return [det for _name, det in found]


def export_coco_results(store: AnnotationStore, target: str | os.PathLike, *,
                        include_identifiers: bool = False,
                        status: str | Iterable[str] | None = None,
                        model: str | None = None) -> Path:
    """Write :func:`coco_results` as a JSON list (atomically); image ids match a COCO export
    of the same project and status filter. ``include_identifiers``: for a uniform signature."""
    data = coco_results(store, status=status, model=model)
    return atomic_write(target, json.dumps(data, indent=1).encode("utf-8"))


def _read_coco(source: Path) -> tuple[dict[int, str], dict[int, dict], list[dict]]:
    """``(category id -> name, image id -> image, annotations)`` of a COCO file."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        cats = {int(c["id"]): " ".join(str(c["name"]).split()) for c in data.get("categories", [])}
        images = {int(im["id"]): im for im in data["images"]}
        anns = list(data.get("annotations", []))
        for a in anns:
            if a["category_id"] not in cats:
                raise ExportError(f"annotation {a.get('id')} has category {a['category_id']!r}, "
                                  "which the file's categories do not list; nothing was imported",
                                  path=str(source))
    except KeyError as exc:
        raise ExportError(f"not a COCO file this version understands (missing or unknown {exc})",
                          path=str(source)) from exc
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot read the COCO file ({exc})", path=str(source)) from exc
    return cats, images, anns


def coco_class_names(source: str | os.PathLike) -> list[str]:
    """The class names a COCO file uses (its annotations' categories and ``cxr_labels``)."""
    return _coco_names(*_read_coco(Path(source)))


def _coco_names(cats: Mapping[int, str], images: Mapping[int, dict], anns: list[dict]) -> list[str]:
    used = [cats[a["category_id"]] for a in anns]
    used += [str(k) for im in images.values() for k in (im.get("cxr_labels") or {})]
    return list(dict.fromkeys(used))


def import_coco(store: AnnotationStore, source: str | os.PathLike, *,
                images_dir: str | os.PathLike | None = None,
                skip_duplicates: bool = True,
                mapping: Mapping[str, str | None] | None = None,
                add_unknown: bool = False) -> Edit:
    """Import a COCO JSON (ours or another tool's): boxes, and labels/status if present.

    Category names are mapped onto the project's label set (see the module docstring:
    ``mapping``, ``add_unknown``; unmapped names raise :class:`UnmappedClassesError`);
    images are matched by ``cxr_sop_uid``/``cxr_sha256`` when present, else by file name.
    Returns the batch :class:`Edit` (one undo step).
    """
    source = Path(source)
    cats, images, anns = _read_coco(source)
    sids: dict[int, int] = {}
    with store.batch(f"import {source.name}") as batch:  # one transaction, one undo step
        names = resolve_classes(store, _coco_names(cats, images, anns), source, mapping=mapping,
                                add_unknown=add_unknown)
        for iid, im in images.items():
            name = PurePath(str(im["file_name"])).name
            ident = StudyIdentity(name, im.get("cxr_sop_uid") or None,
                                  im.get("cxr_sha256") or None)
            path = (str(Path(images_dir) / name) if images_dir is not None
                    else im.get("cxr_path") or None)
            sids[iid] = store.ensure_study(ident, width=int(im["width"]),
                                           height=int(im["height"]), path=path).id
        existing = {sid: _box_keys(store, sid) for sid in set(sids.values())}
        for a in anns:
            sid = sids[int(a["image_id"])]
            label = names[cats[a["category_id"]]]
            if label is None:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            if skip_duplicates and (label, x, y, w, h) in existing[sid]:
                continue
            existing[sid].add((label, x, y, w, h))
            source_kind = a.get("cxr_source") if a.get("cxr_source") in ("manual", "model") \
                else "manual"
            model_name = a.get("cxr_model") if source_kind == "model" else None
            if source_kind == "model" and not model_name:
                source_kind = "manual"
            store.add_box(sid, label, x, y, w, h, source=source_kind, model_name=model_name,
                          score=a.get("cxr_score", a.get("score")))
        for iid, im in images.items():
            for cls, state in (im.get("cxr_labels") or {}).items():
                if state in LABEL_STATES and names.get(str(cls)) is not None:
                    store.set_label(sids[iid], str(names[str(cls)]), state)
            if im.get("cxr_status") in REVIEW_STATUSES and im["cxr_status"] != "unseen":
                store.set_status(sids[iid], im["cxr_status"])
    assert batch.edit is not None
    log.info("imported %d boxes from %s", len(batch.edit.box_ids), source)
    return batch.edit


def _box_keys(store: AnnotationStore, sid: int) -> set[tuple]:
    return {(b.label, b.x, b.y, b.w, b.h) for b in store.boxes(sid)}


# ---- NIH BBox_List_2017.csv ------------------------------------------------------
def nih_csv_text(store: AnnotationStore, *, status: str | Iterable[str] | None = None) -> str:
    """The boxes in the NIH ``BBox_List_2017.csv`` layout (header exactly as released)."""
    buf = io.StringIO()
    buf.write(NIH_BBOX_HEADER + "\n")
    w = csv.writer(buf, lineterminator="\n")
    for it in _collect(store, status, with_empty=False):
        for b in it.boxes:
            w.writerow([it.name, _nih_name(b.label), _num(b.x), _num(b.y), _num(b.w), _num(b.h)])
    return buf.getvalue()


def export_nih_csv(store: AnnotationStore, target: str | os.PathLike, *,
                   include_identifiers: bool = False,
                   status: str | Iterable[str] | None = None) -> Path:
    """Write the NIH box CSV (atomically). Image-level labels are not part of this layout.

    ``include_identifiers`` is accepted for a uniform signature; the layout has no
    field for them (file base names only).
    """
    return atomic_write(target, nih_csv_text(store, status=status).encode("utf-8"))


def read_nih_csv(source: str | os.PathLike) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """Parse an NIH box CSV (``.csv`` or ``.csv.gz``): image name -> [(class, x, y, w, h)].

    Classes are as written (NIH spellings such as ``Infiltrate`` as the NIH class name);
    :func:`import_nih_csv` maps them onto the project's label set."""
    source = Path(source)
    out: dict[str, list[tuple[str, float, float, float, float]]] = {}
    try:
        raw = source.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read the NIH box CSV ({exc})", path=str(source)) from exc
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not any(c.strip() for c in row):
            continue
        if n == 1 and row[0].strip().lower() == "image index":
            continue
        try:
            name = row[0].strip()
            label = " ".join(row[1].split())
            label = ALIASES.get(label, label)
            if not label:
                raise ValueError("no class")
            x, y, w, h = (float(v) for v in row[2:6])
        except (IndexError, ValueError, KeyError) as exc:
            raise ExportError(f"line {n}: not an NIH box row ({exc}): {row!r}",
                              path=str(source)) from exc
        out.setdefault(name, []).append((label, x, y, w, h))
    return out


def import_nih_csv(store: AnnotationStore, source: str | os.PathLike, *,
                   image_size: tuple[int, int] | Callable[[str], tuple[int, int]] = NIH_IMAGE_SIZE,
                   images_dir: str | os.PathLike | None = None,
                   identity_fn: Callable[[Path], StudyIdentity] | None = None,
                   skip_duplicates: bool = True,
                   mapping: Mapping[str, str | None] | None = None,
                   add_unknown: bool = False) -> Edit:
    """Import an NIH box CSV as one batch edit (boxes become "manual" boxes).

    Class names are mapped onto the project's label set (``mapping``, ``add_unknown``: see
    the module docstring; unmapped names raise :class:`UnmappedClassesError`).

    ``image_size`` is ``(width, height)`` of the images the boxes refer to (the
    released PNGs are 1024 x 1024) or a callable of the image name. With
    ``images_dir`` the path hint is ``images_dir/name``; with ``identity_fn`` too,
    existing files get their real identity now (else it is resolved when opened).
    """
    rows = read_nih_csv(source)
    sids: dict[str, int] = {}
    with store.batch(f"import {Path(source).name}") as batch:  # one transaction, one undo step
        names = resolve_classes(store, (b[0] for bxs in rows.values() for b in bxs), source,
                                mapping=mapping, add_unknown=add_unknown)
        for name in rows:
            w, h = image_size(name) if callable(image_size) else image_size
            path = Path(images_dir) / name if images_dir is not None else None
            ident = StudyIdentity(PurePath(name).name)
            if identity_fn is not None and path is not None and path.is_file():
                ident = identity_fn(path)
            sids[name] = store.ensure_study(ident, width=w, height=h,
                                            path=None if path is None else str(path)).id
        for name, boxes in rows.items():
            sid = sids[name]
            existing = _box_keys(store, sid) if skip_duplicates else set()
            for raw, x, y, w, h in boxes:
                label = names[raw]
                if label is None or (label, x, y, w, h) in existing:
                    continue
                existing.add((label, x, y, w, h))
                store.add_box(sid, label, x, y, w, h)
    assert batch.edit is not None
    return batch.edit


# ---- Pascal VOC and YOLO (one file per image; folder or .zip) ------------------------
def voc_pixels(x: float, y: float, w: float, h: float, width: int, height: int
               ) -> tuple[int, int, int, int]:
    """A box's VOC ``xmin, ymin, xmax, ymax``: 1-based inclusive integer pixel indices (the
    0-based pixel-edge box ``x .. x+w`` rounded to whole pixels, then ``xmin = x0 + 1``,
    ``xmax = x1``), clamped to the image; a reader's ``xmin - 1, xmax`` gives the edges back
    within half a pixel."""
    x0, y0 = min(max(round(x), 0), width - 1), min(max(round(y), 0), height - 1)
    x1, y1 = min(max(round(x + w), x0 + 1), width), min(max(round(y + h), y0 + 1), height)
    return x0 + 1, y0 + 1, x1, y1


def voc_xml(item: _Item, include_identifiers: bool = False, image_name: str | None = None
            ) -> bytes:
    """One Pascal VOC annotation XML: integer 1-based pixel coordinates (:func:`voc_pixels`).

    ``image_name``: the file name in ``JPEGImages`` (default: the image's own base name)."""
    rec = item.study
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = _xml_text(image_name or item.name)
    if include_identifiers and rec.path:
        ET.SubElement(root, "path").text = _xml_text(rec.path)
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "cxrviewer"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(rec.width)
    ET.SubElement(size, "height").text = str(rec.height)
    ET.SubElement(size, "depth").text = "1"
    ET.SubElement(root, "segmented").text = "0"
    for b in item.boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = b.label
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        edges = voc_pixels(b.x, b.y, b.w, b.h, rec.width, rec.height)
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), edges):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def yolo_txt(item: _Item, index: Mapping[str, int]) -> bytes:
    """YOLO lines ``class cx cy w h`` (class = ``index[label]``, the project's label set order;
    coordinates in [0, 1])."""
    W, H = float(item.study.width), float(item.study.height)
    lines = [f"{index[b.label]} {(b.x + b.w / 2) / W:.8f} {(b.y + b.h / 2) / H:.8f} "
             f"{b.w / W:.8f} {b.h / H:.8f}" for b in item.boxes]
    return ("\n".join(lines) + ("\n" if lines else "")).encode("ascii")


def _write_many(target: Path, files: Mapping[str, bytes | Path],
                owned: Callable[[str], bool] = lambda _rel: False) -> Path:
    """Write ``files`` (relative name -> bytes, or a :class:`Path` to copy) as one atomic
    ``*.zip`` or one folder renamed into place whole.

    ``owned(relative path)``: whether a file in an existing target folder is one this
    export writes (the folder is then replaced); any other file refuses the export.
    """
    if target.suffix.lower() == ".zip":
        def fill(fh: IO[bytes]) -> None:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    if isinstance(data, Path):
                        zf.write(data, name)
                    else:
                        zf.writestr(name, data)
        return atomic_write(target, fill)

    def fill_folder(tmp: Path) -> None:
        for name, data in files.items():
            if isinstance(data, Path):
                _copy_file(data, tmp / name)
            else:
                _write_file(tmp / name, data)
    return write_folder(target, fill_folder, owned)


def write_folder(target: str | os.PathLike, fill: Callable[[Path], Any],
                 owned: Callable[[str], bool] = lambda _rel: False) -> Path:
    """Fill a temporary sibling folder with ``fill(folder)`` and rename it to ``target`` whole.

    ``owned(relative path)``: whether a file in an existing target folder is one this export
    writes (the folder is then replaced once the new one is complete); any other file refuses
    the export. On any error the temporary folder goes, an existing target is left unchanged
    and :class:`ExportError` is raised (an ``ExportError`` from ``fill`` passes through).
    """
    target = Path(target)
    _check_replaceable(target, owned)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = mkdtemp_beside(target)
        fill(tmp)
        for folder in {p for p in tmp.rglob("*") if p.is_dir()} | {tmp}:
            _fsync_dir(folder)
        _swap_in(tmp, target)
        tmp = None
    except (OSError, ValueError, TypeError, AnnotationStoreError) as exc:
        raise ExportError(f"could not write the folder ({exc}); any existing folder was left "
                          "unchanged", path=str(target)) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_replaceable(target: Path, owned: Callable[[str], bool]) -> None:
    """Refuse a target that is a file, or a folder holding files this export does not write."""
    if target.exists() and not target.is_dir():
        raise ExportError("a file is in the way of the export folder; nothing was written",
                          path=str(target))
    if target.is_dir():
        foreign = next((p for p in target.rglob("*")  # stops at the first one
                        if not p.is_dir() and not owned(p.relative_to(target).as_posix())), None)
        if foreign is not None:
            raise ExportError(
                f"the folder holds files this export does not write (e.g. {foreign.name!r}); "
                "choose a new or empty folder. Nothing was written", path=str(target))


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        _fsync(fh.fileno())


def _copy_file(source: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    with open(path, "rb") as fh:
        _fsync(fh.fileno())


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` folder to ``target``; an old target goes only afterwards."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent if str(target.parent) else Path("."))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


#: image files copied into VOC ``JPEGImages`` / YOLO ``images`` (those the usual training tools
#: decode; a DICOM study's labels are written, its image is listed in ``images_missing.txt``)
COPIED_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: the files of the VOCdevkit layout, under the export folder
VOC_ROOT = "VOCdevkit/VOC2007"
MISSING_LIST = "images_missing.txt"


def _image_files(items: Iterable[_Item]) -> tuple[dict[str, tuple[str, Path]], str]:
    """``{stem: (image file name, source)}`` of the images that can be copied, and the text of
    :data:`MISSING_LIST` for the others (one ``name<TAB>why`` line each)."""
    found: dict[str, tuple[str, Path]] = {}
    missing = []
    for it in items:
        src = Path(it.study.path) if it.study.path else None
        suffix = PurePath(src.name if src else it.name).suffix.lower()  # the file's own kind
        if suffix not in COPIED_IMAGE_SUFFIXES:
            missing.append(f"{it.name}\tnot an image file these tools read ({suffix or 'no suffix'}"
                           "); convert it to PNG")
        elif src is None or not src.is_file():
            missing.append(f"{it.name}\tfile not found (open the study once so the project "
                           "learns where it is)")
        else:
            found[it.stem] = (f"{it.stem}{suffix}", src)
    return found, "".join(f"{_XML_BAD.sub('_', line)}\n" for line in missing)


def _owned_with_labels(target: Path, images: str, labels: str, label_suffix: str,
                       fixed: Iterable[str]) -> Callable[[str], bool]:
    """What an earlier export of this layout wrote: the ``fixed`` files, files in ``labels``
    with ``label_suffix``, and files in ``images`` that have such a label file beside."""
    fixed = set(fixed)

    def owned(rel: str) -> bool:
        folder, _, name = rel.rpartition("/")
        if rel in fixed or (folder == labels and name.endswith(label_suffix)):
            return True
        return folder == images and (target / labels / f"{PurePath(name).stem}{label_suffix}"
                                     ).is_file()
    return owned


def export_voc(store: AnnotationStore, target: str | os.PathLike, *,
               include_identifiers: bool = False,
               status: str | Iterable[str] | None = None) -> Path:
    """Pascal VOC in the VOCdevkit layout (folder ``target`` or a ``.zip``).

    ``VOCdevkit/VOC2007/Annotations/<stem>.xml`` per image (integer 1-based coordinates),
    ``JPEGImages/<stem><suffix>`` (the PNG/JPEG images copied; others listed in
    ``images_missing.txt``), ``ImageSets/Main/trainval.txt`` (every image) and
    ``<class>_trainval.txt`` per label (``stem  1`` / ``stem -1``: whether the image has one).
    """
    items = _collect(store, status)
    _label_index(store.label_set, items, target)
    images, missing = _image_files(items)
    main = f"{VOC_ROOT}/ImageSets/Main"
    files: dict[str, bytes | Path] = {}
    for it in items:
        name = images[it.stem][0] if it.stem in images else None
        files[f"{VOC_ROOT}/Annotations/{it.stem}.xml"] = voc_xml(it, include_identifiers, name)
        if name is not None:
            files[f"{VOC_ROOT}/JPEGImages/{name}"] = images[it.stem][1]
    files[f"{main}/trainval.txt"] = "".join(f"{it.stem}\n" for it in items).encode("utf-8")
    sets = {lab: f"{main}/{safe_stem(lab)}_trainval.txt" for lab in store.label_set.labels}
    for label, name in sets.items():
        files[name] = "".join(f"{it.stem} {' 1' if any(b.label == label for b in it.boxes) else '-1'}\n"
                              for it in items).encode("utf-8")
    if missing:
        files[MISSING_LIST] = missing.encode("utf-8")
    root = Path(target)
    return _write_many(root, files, _owned_with_labels(
        root, f"{VOC_ROOT}/JPEGImages", f"{VOC_ROOT}/Annotations", ".xml",
        {MISSING_LIST, f"{main}/trainval.txt", *sets.values()}))


def yolo_data_yaml(labels: Iterable[str], root: str) -> bytes:
    """Ultralytics ``data.yaml``: ``path`` (the dataset root), ``train``/``val`` (both
    ``images``: one split, every image), ``names`` (index: label, the label set's order)."""
    names = "".join(f"  {i}: {json.dumps(lab)}\n" for i, lab in enumerate(labels))
    return ("# cxrviewer annotations as an Ultralytics YOLO dataset. train and val are the same\n"
            "# images (one split): make your own split before training on it.\n"
            f"path: {json.dumps(root)}\ntrain: images\nval: images\nnames:\n{names}"
            ).encode("utf-8")


def export_yolo(store: AnnotationStore, target: str | os.PathLike, *,
                include_identifiers: bool = False,
                status: str | Iterable[str] | None = None) -> Path:
    """YOLO in the Ultralytics dataset layout (folder ``target`` or a ``.zip``).

    ``data.yaml`` (:func:`yolo_data_yaml`; ``path`` is the export folder's absolute path, ``.``
    in a ``.zip``, which Ultralytics replaces by where it unpacks it), ``images/<stem><suffix>``
    (the PNG/JPEG images copied; others listed in ``images_missing.txt``),
    ``labels/<stem>.txt`` per image and ``classes.txt`` (the label set, one per line). A
    ``labels.cache`` Ultralytics left in an earlier export goes with it (it would be stale).
    ``include_identifiers`` is accepted for a uniform signature (YOLO has no such field).
    """
    ls = store.label_set
    items = _collect(store, status)
    index = _label_index(ls, items, target)
    root = Path(target)
    images, missing = _image_files(items)
    where = "." if root.suffix.lower() == ".zip" else str(root.resolve())
    files: dict[str, bytes | Path] = {
        "data.yaml": yolo_data_yaml(ls.labels, where),
        "classes.txt": ("\n".join(ls.labels) + "\n").encode("utf-8")}
    for it in items:
        files[f"labels/{it.stem}.txt"] = yolo_txt(it, index)
        if it.stem in images:
            files[f"images/{images[it.stem][0]}"] = images[it.stem][1]
    if missing:
        files[MISSING_LIST] = missing.encode("utf-8")
    return _write_many(root, files, _owned_with_labels(
        root, "images", "labels", ".txt",
        {"data.yaml", "classes.txt", MISSING_LIST, "labels.cache"}))  # (Ultralytics' cache)


#: Export functions by format name (for the CLI / GUI menus); same signature each:
#: ``fn(store, target, *, include_identifiers=False, status=None) -> Path``.
EXPORTERS: dict[str, Callable[..., Path]] = {
    "coco": export_coco,
    "coco-results": export_coco_results,
    "voc": export_voc,
    "yolo": export_yolo,
    "nih-csv": export_nih_csv,
}
#: Import functions by format name: ``fn(store, source, ...) -> Edit`` (one undo step).
IMPORTERS: dict[str, Callable[..., Edit]] = {
    "coco": import_coco,
    "nih-csv": import_nih_csv,
}


def export_store(store: AnnotationStore, target: str | os.PathLike, fmt: str, *,
                 include_identifiers: bool = False,
                 status: str | Iterable[str] | None = None) -> Path:
    """Export in format ``fmt`` (a key of :data:`EXPORTERS`)."""
    try:
        fn = EXPORTERS[fmt.lower()]
    except KeyError:
        raise ExportError(f"unknown export format {fmt!r}; choose one of "
                          f"{', '.join(EXPORTERS)}", path=str(target)) from None
    return fn(store, target, include_identifiers=include_identifiers, status=status)
