"""DICOM in: boxes from SR measurement reports and presentation states, masks from SEG.

Read with pydicom only (no pixel data is decoded for SR/GSPS), so an SR, GSPS or SEG written by
another tool is read the same way as ours:

* **SR** (any SR storage class): every measurement-group-like CONTAINER holding a 2-D ``SCOORD``
  ``POLYLINE`` of at least 4 points (a rectangle or any polygon: its bounding box is taken) and a
  coded finding (concept "Finding", DCM 121071). Groups without a finding code,
  lines (2-point polylines), points, circles, ellipses and 3-D coordinates (SCOORD3D) are skipped
  and counted in :attr:`DicomBoxes.skipped`. Provenance: our ``99CXRV PROV`` evaluation, else
  "model" when the group names an algorithm (DCM 111001), else "manual"; the score from our
  ``99CXRV SCORE`` measurement; the annotator from a Person Observer Name in the group.
* **GSPS**: ``POLYLINE`` graphic objects of at least 4 points in ``PIXEL`` units (``DISPLAY``
  units are relative to a viewer's displayed area and are skipped); the class is the text object
  of the same annotation item (ours: ``<class> [manual: ...]``, parsed with its provenance), else
  the graphic layer's description, else its name.
* **SEG** (binary or fractional): one box per segment and source image, the bounding box of the
  segment's pixels (fractional: of the pixels >= half the maximum fractional value), in the
  same pixel-edge coordinates (a mask of columns 3..7 is ``x=3, w=5``). The class is the
  segment's coded property type (our ``"Cardiomegaly >= 0.5"`` segment is coded Cardiomegaly);
  anatomy segments (category Anatomical Structure or a lung/heart code) are marked
  :attr:`BoxRecord.anatomy` and keep the segment label (``left lung``). Empty segments are
  skipped. Provenance: ``AUTOMATIC``/``SEMIAUTOMATIC`` with an algorithm name is "model".
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..annotations.model import Edit, StudyIdentity
from ..annotations.store import AnnotationStore
from ..errors import CxrError
from ._common import (
    ACCEPTED_MODEL, PRIVATE_SCHEME, PROVENANCE, SCORE, SCT_FINDINGS, DicomObjectError,
    DEFER_SIZE, MANUFACTURER, anatomy_code, label_of_code, read_source_header,
)

_SR_CLASSES_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_ANATOMY_CATEGORY = ("91723000", "SCT")
_FINDING_CONCEPTS = {("121071", "DCM")}
_ALGORITHM_NAME = ("111001", "DCM")
_PERSON_NAME = ("121008", "DCM")
_OUR_MANUAL = re.compile(r"^(?P<label>.+?) \[manual: (?P<who>.*)\]$", re.S)
_OUR_MODEL = re.compile(r"^(?P<label>.+?) \[model: (?P<model>.+?)(?:, score (?P<score>[^,\]]+))?"
                        r", accepted by (?P<who>.*)\]$", re.S)


@dataclass(frozen=True)
class BoxRecord:
    """One box read from a DICOM object: class, pixel-edge geometry and provenance.

    ``code``: the finding as ``(value, scheme, meaning)`` where the object coded it;
    ``referenced_sop_uid``: the image the box is drawn on.
    """

    label: str
    x: float
    y: float
    w: float
    h: float
    source: str = "manual"
    model_name: str | None = None
    score: float | None = None
    annotator: str | None = None
    code: tuple[str, str, str] | None = None
    referenced_sop_uid: str | None = None
    tracking_uid: str | None = None
    anatomy: bool = False


@dataclass
class DicomBoxes:
    """What :func:`read_boxes` found in one file."""

    kind: str  # "sr" | "gsps" | "seg"
    sop_uid: str
    boxes: list[BoxRecord] = field(default_factory=list)
    skipped: int = 0

    @property
    def referenced_sop_uids(self) -> list[str]:
        """The images the boxes are drawn on (first-seen order, no repeats)."""
        return list(dict.fromkeys(b.referenced_sop_uid for b in self.boxes
                                  if b.referenced_sop_uid))


def _code(item: Dataset, keyword: str) -> tuple[str, str, str] | None:
    seq = getattr(item, keyword, None)
    if not seq:
        return None
    c = seq[0]
    return (str(getattr(c, "CodeValue", "") or getattr(c, "LongCodeValue", "")),
            str(getattr(c, "CodingSchemeDesignator", "")), str(getattr(c, "CodeMeaning", "")))


def _concept(item: Dataset) -> tuple[str, str]:
    c = _code(item, "ConceptNameCodeSequence")
    return (c[0], c[1]) if c else ("", "")


def _walk(items) -> Iterator[Dataset]:
    for it in items or []:
        yield it
        yield from _walk(getattr(it, "ContentSequence", None))


def _bbox(points: np.ndarray) -> tuple[float, float, float, float] | None:
    """Bounding box of ``[[column, row], ...]``; None for fewer than 4 points or no area."""
    if points.ndim != 2 or points.shape[0] < 4 or not np.all(np.isfinite(points)):
        return None
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    if x1 <= x0 or y1 <= y0:
        return None
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def _points(data) -> np.ndarray:
    flat = np.asarray([float(v) for v in data], dtype=np.float64)
    return flat[: flat.size // 2 * 2].reshape(-1, 2)


def _group_box(group: Dataset) -> BoxRecord | None:
    """The box of one SR measurement group, or None when it holds no rectangle + finding."""
    geom = ref = finding = algo = who = tracking = None
    source, score = None, None
    for it in _walk(getattr(group, "ContentSequence", None)):
        vt, concept = getattr(it, "ValueType", ""), _concept(it)
        if vt == "SCOORD" and geom is None and getattr(it, "GraphicType", "") == "POLYLINE":
            geom = _bbox(_points(it.GraphicData))
            imgs = [c for c in getattr(it, "ContentSequence", []) if c.ValueType == "IMAGE"]
            if imgs and getattr(imgs[0], "ReferencedSOPSequence", None):
                ref = str(imgs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif vt == "CODE" and concept in _FINDING_CONCEPTS and finding is None:
            finding = _code(it, "ConceptCodeSequence")
        elif vt == "CODE" and concept == (PROVENANCE.value, PRIVATE_SCHEME):
            value = _code(it, "ConceptCodeSequence")
            source = "model" if value and value[0] == ACCEPTED_MODEL.value else "manual"
        elif vt == "NUM" and concept == (SCORE.value, PRIVATE_SCHEME):
            mv = getattr(it, "MeasuredValueSequence", None)
            score = float(mv[0].NumericValue) if mv else None
        elif vt == "TEXT" and concept == _ALGORITHM_NAME and algo is None:
            algo = str(it.TextValue)
        elif vt == "PNAME" and concept == _PERSON_NAME and who is None:
            who = str(it.PersonName).rstrip("^") or None
        elif vt == "UIDREF" and concept == ("112040", "DCM"):
            tracking = str(it.UID)
    if geom is None or finding is None or not finding[2] and not finding[0]:
        return None
    if source is None:
        source = "model" if algo else "manual"
    return BoxRecord(label_of_code(*finding), *geom, source=source,
                     model_name=algo if source == "model" else None,
                     score=score if source == "model" else None, annotator=who, code=finding,
                     referenced_sop_uid=ref, tracking_uid=tracking)


def _sr_boxes(ds: Dataset, out: DicomBoxes) -> None:
    for it in _walk(getattr(ds, "ContentSequence", None)):
        if getattr(it, "ValueType", "") != "CONTAINER":
            continue
        if not any(getattr(c, "ValueType", "") in ("SCOORD", "NUM", "SCOORD3D")
                   for c in getattr(it, "ContentSequence", [])):
            continue
        box = _group_box(it)
        if box is None:
            out.skipped += 1
        else:
            out.boxes.append(box)


def _layer_names(ds: Dataset) -> dict[str, str]:
    return {str(la.GraphicLayer): str(getattr(la, "GraphicLayerDescription", "") or la.GraphicLayer)
            for la in getattr(ds, "GraphicLayerSequence", [])}


def _text_provenance(text: str) -> dict:
    """Class and provenance from a text object (ours: see :mod:`.gsps`; else the whole text)."""
    text = " ".join(text.split())
    m = _OUR_MODEL.match(text)
    if m:
        try:
            score = None if m["score"] is None else float(m["score"])
        except ValueError:
            score = None
        return dict(label=m["label"], source="model", model_name=m["model"], score=score,
                    annotator=m["who"] or None)
    m = _OUR_MANUAL.match(text)
    if m:
        return dict(label=m["label"], source="manual", annotator=m["who"] or None)
    return dict(label=text)


def _annotation_boxes(item: Dataset, layers: dict[str, str], out: DicomBoxes) -> None:
    refs = getattr(item, "ReferencedImageSequence", None)
    ref = str(refs[0].ReferencedSOPInstanceUID) if refs else None
    texts = [str(getattr(t, "UnformattedTextValue", "")) for t in
             getattr(item, "TextObjectSequence", [])]
    layer = str(getattr(item, "GraphicLayer", ""))
    info = (_text_provenance(texts[0]) if len(texts) == 1 and texts[0].strip()
            else dict(label=" ".join(layers.get(layer, layer).split())))
    for g in getattr(item, "GraphicObjectSequence", []):
        geom = None
        if (getattr(g, "GraphicType", "") == "POLYLINE"
                and getattr(g, "GraphicAnnotationUnits", "") == "PIXEL"):
            geom = _bbox(_points(g.GraphicData))
        if geom is None or not info["label"]:
            out.skipped += 1
            continue
        out.boxes.append(BoxRecord(**info, x=geom[0], y=geom[1], w=geom[2], h=geom[3],
                                   referenced_sop_uid=ref,
                                   tracking_uid=str(getattr(g, "TrackingUID", "")) or None))


def _segment_box(item: Dataset, geom: tuple[float, float, float, float], ref: str | None
                 ) -> BoxRecord:
    """The box of one segment (``item``: its Segment Sequence entry) on one source image."""
    finding = _code(item, "SegmentedPropertyTypeCodeSequence")
    category = _code(item, "SegmentedPropertyCategoryCodeSequence")
    seg_label = " ".join(str(getattr(item, "SegmentLabel", "") or "").split())
    anatomy = bool(category and category[:2] == _ANATOMY_CATEGORY) or bool(
        finding and anatomy_code(finding[2]) is not None and finding[1] == "SCT")
    if anatomy or not finding:
        label = seg_label or (finding[2] if finding else "")
    else:
        label = label_of_code(*finding)
    algo = str(getattr(item, "SegmentAlgorithmName", "") or "") or None
    model = str(getattr(item, "SegmentAlgorithmType", "")) in ("AUTOMATIC", "SEMIAUTOMATIC") and algo
    return BoxRecord(label, *geom, source="model" if model else "manual",
                     model_name=algo if model else None, code=finding, referenced_sop_uid=ref,
                     anatomy=anatomy)


def _frame_refs(ds: Dataset, n_frames: int) -> list[tuple[int, str | None]]:
    """``(segment number, source SOP Instance UID)`` of each frame of a SEG (per-frame
    functional groups, else the shared ones: a one-segment SEG may keep them there)."""
    series = getattr(ds, "ReferencedSeriesSequence", None) or []
    insts = getattr(series[0], "ReferencedInstanceSequence", None) if series else None
    default = str(insts[0].ReferencedSOPInstanceUID) if insts else None
    shared_seq = getattr(ds, "SharedFunctionalGroupsSequence", None)
    shared = shared_seq[0] if shared_seq else Dataset()
    per_frame = list(getattr(ds, "PerFrameFunctionalGroupsSequence", None) or [])
    if len(per_frame) != n_frames:
        raise ValueError(f"{len(per_frame)} per-frame groups for {n_frames} frames")

    def group(fg: Dataset, keyword: str):
        """A functional group of the frame, else the shared one."""
        return getattr(fg, keyword, None) or getattr(shared, keyword, None)

    out = []
    for fg in per_frame:
        number = int(group(fg, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
        ref = default
        deriv = group(fg, "DerivationImageSequence")
        srcs = getattr(deriv[0], "SourceImageSequence", None) if deriv else None
        if srcs:
            ref = str(srcs[0].ReferencedSOPInstanceUID)
        out.append((number, ref))
    return out


#: the most pixels (all frames) a SEG may hold to be read as boxes (a 4096² image, 64 segments)
MAX_SEG_PIXELS = 64 * 4096 * 4096


def _seg_frames(path: str) -> tuple[Dataset, np.ndarray]:
    """A SEG's dataset and its frames ``[n, rows, columns]`` (a one-line error otherwise)."""
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if min(rows, cols, n_frames) <= 0 or rows * cols * n_frames > MAX_SEG_PIXELS:
            raise DicomObjectError(f"a segmentation of {n_frames} frames of {rows}x{cols} is "
                                   "not read (empty or too large)", path=path)
        return ds, np.asarray(ds.pixel_array).reshape(n_frames, rows, cols)
    except DicomObjectError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's pixel handlers raise many types
        raise DicomObjectError("cannot decode the segmentation's pixels "
                               f"({' '.join(str(exc).split())[:200]})", path=path) from exc


def _seg_boxes(path: str, out: DicomBoxes) -> None:
    """The boxes of a SEG file (see the module docstring) into ``out``."""
    ds, frames = _seg_frames(path)
    n_frames = frames.shape[0]
    if str(getattr(ds, "SegmentationType", "")) == "FRACTIONAL":
        frames = frames >= float(getattr(ds, "MaximumFractionalValue", 255)) / 2
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    union: dict[tuple[int, str | None], np.ndarray] = {}
    for i, key in enumerate(_frame_refs(ds, n_frames)):
        if key[0] not in segments:
            raise ValueError(f"frame {i + 1} names segment {key[0]}, which is not described")
        plane = frames[i] != 0
        union[key] = union[key] | plane if key in union else plane
    for (number, ref), mask in union.items():
        if not mask.any():
            out.skipped += 1
            continue
        r = np.flatnonzero(mask.any(axis=1))
        c = np.flatnonzero(mask.any(axis=0))
        geom = (float(c[0]), float(r[0]), float(c[-1] - c[0] + 1), float(r[-1] - r[0] + 1))
        out.boxes.append(_segment_box(segments[number], geom, ref))


def read_boxes(path: str | os.PathLike) -> DicomBoxes:
    """The boxes of an SR, GSPS or SEG file (ours or another tool's; see the module docstring).

    Raises :class:`DicomObjectError` for an unreadable file or another kind of DICOM object.
    """
    p = str(path)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad input
        raise DicomObjectError(f"cannot read the DICOM file ({' '.join(str(exc).split())[:200]})",
                               path=p) from exc
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    out = DicomBoxes("sr", str(getattr(ds, "SOPInstanceUID", "")))
    try:
        if sop_class.startswith(_SR_CLASSES_PREFIX):
            _sr_boxes(ds, out)
        elif sop_class == _SEG_CLASS:
            out.kind = "seg"
            _seg_boxes(p, out)
        elif sop_class == _GSPS_CLASS:
            out.kind = "gsps"
            layers = _layer_names(ds)
            for item in getattr(ds, "GraphicAnnotationSequence", []):
                _annotation_boxes(item, layers, out)
        else:
            raise DicomObjectError("not a structured report, segmentation or grayscale "
                                   f"presentation state (SOP class {sop_class or 'missing'})", path=p)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError, RecursionError) as exc:
        raise DicomObjectError(f"malformed {out.kind.upper()} content ({exc})", path=p) from exc
    return out


def read_segmentation(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The segments of a SEG file as ``{segment label: 2-D array}`` (binary: bool; fractional:
    float32 in [0, 1]); only single-image segmentations (one frame per segment)."""
    import highdicom as hd  # heavy import, only when a SEG is read

    p = str(path)
    try:
        seg = hd.seg.segread(p)
        fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
        out: dict[str, np.ndarray] = {}
        for number in seg.segment_numbers:
            label = str(seg.get_segment_description(number).segment_label)
            frames = seg.get_source_image_uids()
            arr = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[frames[0][2]], segment_numbers=[number],
                combine_segments=False, rescale_fractional=True)[0, :, :, 0]
            out[label] = arr.astype(np.float32) if fractional else arr.astype(bool)
    except DicomObjectError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types on bad input
        raise DicomObjectError(f"cannot read the segmentation ({' '.join(str(exc).split())[:200]})",
                               path=p) from exc
    return out


def split_anatomy(store: AnnotationStore, boxes: list[BoxRecord]
                  ) -> tuple[list[BoxRecord], list[str]]:
    """``(boxes to import, labels of the anatomy boxes left out)``: an anatomy box (a SEG's lung
    or heart segment) is a structure, not a finding; it is kept (with the project's spelling)
    only when the project's label set holds its label, e.g. the ``lung-heart`` set."""
    kept, skipped = [], []
    for box in boxes:
        if not box.anatomy:
            kept.append(box)
            continue
        label = store.label_set.canonical(box.label)
        if label is None:
            skipped.append(box.label)
        else:
            kept.append(replace(box, label=label))
    return kept, skipped


def anatomy_note(skipped: list[str]) -> str:
    """What an import says about the anatomy segments it left out ('' for none)."""
    if not skipped:
        return ""
    names = ", ".join(dict.fromkeys(skipped))
    n = len(skipped)
    return (f"skipped {n} anatomy segment{'' if n == 1 else 's'} ({names}): structures, not "
            "findings of the project's label set")


def _project_label(store: AnnotationStore, box: BoxRecord) -> str:
    """The project's label for a box: for a SNOMED CT finding, whichever of our names for that
    code the project's label set holds (``Effusion`` or ``Pleural effusion``), else the label."""
    if box.code and box.code[1] != PRIVATE_SCHEME:
        ls = store.label_set
        for name, code in SCT_FINDINGS.items():
            if (code.value, code.scheme_designator) == box.code[:2] and name in ls:
                return name
    return box.label


def no_boxes_error(found: DicomBoxes, anatomy: list[str], path: str | os.PathLike
                   ) -> DicomObjectError:
    """The error of a file with nothing to import (what was skipped, and why)."""
    n = found.skipped
    what = (f"empty segment{'' if n == 1 else 's'}" if found.kind == "seg"
            else "items that are not rectangles with a finding")
    parts = [f"skipped {n} {what}"] if n or not anatomy else []
    if anatomy:
        parts.append(anatomy_note(anatomy))
    return DicomObjectError(f"no boxes in this {found.kind.upper()} ({'; '.join(parts)})",
                            path=str(path))


def _captured_study(store: AnnotationStore, head: Dataset, source: str | os.PathLike
                    ) -> int | None:
    """The project's PNG/JPEG/NIH study a cxrviewer Secondary Capture (``source``) was made of:
    the capture holds the study's stored pixels unchanged, so its pixel hash is the study's
    identity. None when ``source`` is no capture of ours or its image is not in the project."""
    kinds = [str(v).upper() for v in (getattr(head, "ImageType", None) or [])]
    if (str(getattr(head, "Manufacturer", "")) != MANUFACTURER or kinds[:2] != ["DERIVED", "SECONDARY"]
            or str(getattr(head, "ConversionType", "")) != "WSD"):
        return None
    from ..io import load_study  # (decodes the capture's pixels)

    try:
        sha = load_study(source).pixel_sha256()
    except CxrError:
        return None
    rec = store.find_study(StudyIdentity(Path(source).name, sha256=sha))
    return rec.id if rec is not None and rec.identity.sha256 == sha else None


def _study_for(store: AnnotationStore, ref: str | None, study_id: int | None,
               source: str | os.PathLike | None, where: str) -> int:
    """The project study the boxes of ``ref`` go to (see :func:`import_boxes`)."""
    if study_id is not None:
        rec = store.study(study_id)
        if ref and rec.identity.sop_uid and rec.identity.sop_uid != ref:
            raise DicomObjectError(f"the boxes are drawn on image {ref}, study {study_id} is "
                                   f"image {rec.identity.sop_uid}", path=where)
        return rec.id
    if ref:
        rec = store.find_study(StudyIdentity(f"{ref}.dcm", sop_uid=ref))
        if rec is not None:
            return rec.id
    if source is None:
        raise DicomObjectError(f"the image the boxes are drawn on ({ref or 'not named'}) is not "
                               "in the project; open it first or name its file", path=where)
    head = read_source_header(source)
    if ref and str(head.SOPInstanceUID) != ref:
        raise DicomObjectError(f"{Path(source).name} is image {head.SOPInstanceUID}, the boxes are"
                               f" drawn on {ref}", path=where)
    captured = _captured_study(store, head, source)
    if captured is not None:
        return captured
    ident = StudyIdentity(Path(source).name, sop_uid=str(head.SOPInstanceUID))
    return store.ensure_study(ident, width=int(head.Columns), height=int(head.Rows),
                              path=str(source)).id


def import_boxes(store: AnnotationStore, path: str | os.PathLike, *,
                 study_id: int | None = None, source: str | os.PathLike | None = None,
                 skip_duplicates: bool = True) -> Edit:
    """Add the boxes of an SR, GSPS or SEG file to a project, as one batch edit (one undo step);
    a SEG's anatomy segments are left out unless the label set holds them (:func:`split_anatomy`).

    The study: ``study_id`` when given (it must be the image the boxes are drawn on, where the
    project knows its SOP Instance UID), else the project's study with the referenced SOP
    Instance UID, else ``source`` (the referenced DICOM file; the study is created from its
    header). Classes go through the store's label check: a class the project's label set does
    not hold raises the store's error and nothing is added. Boxes already in the study (same
    class and geometry) are skipped with ``skip_duplicates``. The store records the importing
    annotator; a model box keeps its model and score.
    """
    found = read_boxes(path)
    boxes, anatomy = split_anatomy(store, found.boxes)
    if not boxes:
        raise no_boxes_error(found, anatomy, path)
    with store.batch(f"import {Path(path).name}") as batch:
        sids: dict[str | None, int] = {}
        for box in boxes:
            ref = box.referenced_sop_uid
            if ref not in sids:
                sids[ref] = _study_for(store, ref, study_id, source, str(path))
            sid = sids[ref]
            label = _project_label(store, box)
            key = (label, box.x, box.y, box.w, box.h)
            if skip_duplicates and any((b.label, b.x, b.y, b.w, b.h) == key
                                       for b in store.boxes(sid)):
                continue
            model = box.source == "model" and bool(box.model_name)
            store.add_box(sid, label, box.x, box.y, box.w, box.h,
                          source="model" if model else "manual",
                          model_name=box.model_name if model else None,
                          score=box.score if model else None)
    assert batch.edit is not None
    return batch.edit
