"""A whole project's boxes (or masks) as DICOM, and SR/GSPS/SEG files back into a project.

The functions behind ``cxrviewer annotations export PROJECT OUTDIR --format dicom`` /
``import PROJECT FILE --format dicom-sr`` and the annotation project's Export/Import menu
entries (the same code for both):

* :func:`export_dicom` writes, for every study with accepted boxes, a folder named like the
  VOC/YOLO files (:func:`~cxrviewer.core.annotations.export.study_items`) holding ``SR.dcm``
  (TID 1500) and/or ``PR.dcm`` (GSPS), plus ``SC.dcm`` for a PNG/JPEG/NIH study (the Secondary
  Capture the others reference). The whole export is written into a temporary folder renamed
  into place, so nothing half-written appears. A study whose image cannot be found (or has
  changed) is skipped and listed in :attr:`DicomExport.skipped`; when no study can be written
  the export fails and writes nothing. The objects carry the source image's patient/study
  context (a PACS needs it): unlike the other formats they identify the patient where the
  source image does.
* :func:`import_dicom` adds an SR's, GSPS's or SEG's boxes to a project as one undo step (a
  SEG's lung/heart segments only when the project's label set has them); the images
  the boxes are drawn on are found in the project by SOP Instance UID, else among the DICOM
  files of ``studies_dir`` (a study is then created from that file's header). Classes are
  mapped onto the project's label set as for COCO/NIH imports (``mapping``, ``add_unknown``;
  unmapped classes raise :class:`~cxrviewer.core.annotations.export.UnmappedClassesError`).

Importing this module (or :func:`register_formats`) registers these functions in the annotation
:data:`~cxrviewer.core.annotations.export.EXPORTERS` (``dicom``, ``dicom-sr``, ``gsps``) and
:data:`~cxrviewer.core.annotations.export.IMPORTERS` (``dicom-sr``, ``gsps``, ``dicom-seg``), so
:meth:`AnnotationSession.import_from` (undo stack) reaches them once they are loaded (the
annotation layer cannot import this heavier one itself).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ..annotations.export import (
    EXPORTERS, IMPORTERS, resolve_classes, study_items, write_folder,
)
from ..annotations.model import Edit, StudyIdentity, StudyRecord
from ..annotations.store import AnnotationStore
from ._common import DicomObjectError
from .project import FILE_NAMES, export_study
from .read import _project_label, _study_for, anatomy_note, no_boxes_error, read_boxes, split_anatomy

#: what each export format name writes per study (a SC.dcm is added for non-DICOM studies)
EXPORT_KINDS: dict[str, tuple[str, ...]] = {"dicom": ("sr", "gsps"), "dicom-sr": ("sr",),
                                            "gsps": ("gsps",),
                                            "dicom-seg": ("seg", "threshold", "fractional")}
_SEG_KINDS = {"seg", "threshold", "fractional"}
_OUR_FILES = set(FILE_NAMES.values())


@dataclass
class DicomExport:
    """What :func:`export_dicom` wrote: ``written`` {study folder: [file names]} and ``skipped``
    [(image name, why)]."""

    folder: Path
    written: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # study folder: where masks came from

    def summary(self) -> str:
        """One line: how many studies and files were written, how many skipped."""
        n_files = sum(len(v) for v in self.written.values())
        captures = sum(FILE_NAMES["sc"] in v for v in self.written.values())
        text = (f"{len(self.written)} stud{'y' if len(self.written) == 1 else 'ies'}, "
                f"{n_files} DICOM files ({captures} secondary capture"
                f"{'' if captures == 1 else 's'}) in {self.folder}")
        if self.origins:
            stored = sum("results" in o for o in self.origins.values())
            ran = sum("masks by" in o for o in self.origins.values())
            text += f"; {stored} from stored analyses, {ran} with masks by the segmentation model"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} that could not be written"
        return text


def _owned(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 and parts[1] in _OUR_FILES


@dataclass
class StudyInputs:
    """The masks and maps of one study for a SEG export (see :func:`export_dicom`):
    ``masks`` {name: bool mask}, ``thresholded`` [(class, map, threshold)], ``fractional``
    {class: map in [0, 1]}, all at the image size; ``algorithm``/``map_algorithm``: the models
    that made them; ``origin``: one line saying where they came from (a results file, a model
    run)."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    thresholded: list[tuple[str, np.ndarray, float]] = field(default_factory=list)
    fractional: dict[str, np.ndarray] = field(default_factory=dict)
    algorithm: str | None = None
    map_algorithm: str | None = None
    origin: str = ""


#: ``fn(study record) -> StudyInputs``; raises :class:`DicomObjectError` when it has none
InputsFn = Callable[[StudyRecord], StudyInputs]


def _export_one(store: AnnotationStore, rec: StudyRecord, folder: Path, kinds: Sequence[str],
                inputs: InputsFn | None) -> tuple[dict[str, Path], str]:
    """One study's files (``{kind: path}``) and where its masks/maps came from."""
    if not set(kinds) & _SEG_KINDS:
        return export_study(store, rec.id, folder), ""
    if inputs is None:
        raise DicomObjectError("a SEG export needs the study's masks and maps (none given)")
    got = inputs(rec)
    return export_study(store, rec.id, folder, masks=got.masks, thresholded=got.thresholded,
                        fractional=got.fractional, algorithm=got.algorithm,
                        map_algorithm=got.map_algorithm,
                        boxes=bool(set(kinds) & {"sr", "gsps"})), got.origin


def export_dicom(store: AnnotationStore, target: str | os.PathLike, *,
                 kinds: Sequence[str] = ("sr", "gsps"),
                 status: str | Iterable[str] | None = None,
                 inputs: InputsFn | None = None) -> DicomExport:
    """Write every study's boxes (or masks and maps) as DICOM into the folder ``target`` (see
    the module docstring).

    ``kinds``: any of ``"sr"``, ``"gsps"`` (studies with boxes) and ``"seg"``, ``"threshold"``,
    ``"fractional"`` (every study: ``inputs(record)`` gives its masks and maps, see
    :mod:`cxrviewer.core.seg_export`); ``status``: only studies with these review statuses.
    Raises :class:`DicomObjectError` when no study could be written (nothing is written then).
    """
    wanted = {FILE_NAMES[k] for k in kinds} | {FILE_NAMES["sc"]}
    result = DicomExport(Path(target))
    segs = bool(set(kinds) & _SEG_KINDS)

    def fill(tmp: Path) -> None:
        for it in study_items(store, status, with_empty=segs):
            try:
                files, origin = _export_one(store, it.study, tmp / it.stem, kinds, inputs)
            except DicomObjectError as exc:
                shutil.rmtree(tmp / it.stem, ignore_errors=True)  # (a write that failed half-way)
                result.skipped.append((it.name, " ".join(str(exc).split())))
                continue
            for path in files.values():
                if path.name not in wanted:
                    path.unlink()
            result.written[it.stem] = sorted(p.name for p in files.values() if p.name in wanted)
            if origin:
                result.origins[it.stem] = origin
        what = "masks or maps" if segs else "accepted boxes"
        if not result.written and not result.skipped:
            raise DicomObjectError(f"no study has {what}" + (
                " with that review status" if status else "") + "; nothing was written",
                path=str(target))
        if not result.written:
            first = result.skipped[0]
            raise DicomObjectError(
                f"no study could be written ({len(result.skipped)} skipped: "
                f"{first[0]}: {first[1]}); nothing was written", path=str(target))

    write_folder(target, fill, _owned)
    return result


def find_dicom_files(folder: str | os.PathLike, sop_uids: Iterable[str]) -> dict[str, Path]:
    """``{SOP Instance UID: file}`` for those of ``sop_uids`` found among the DICOM Part 10 files
    (``DICM`` preamble, any name) under ``folder``; stops once all are found."""
    wanted = {u for u in sop_uids if u}
    found: dict[str, Path] = {}
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if len(found) == len(wanted):
            break
        try:
            with open(path, "rb") as fh:
                if fh.read(132)[128:] != b"DICM":
                    continue
            uid = str(pydicom.dcmread(path, stop_before_pixels=True,
                                      specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - an unreadable file is simply not a match
            continue
        if uid in wanted:
            found.setdefault(uid, path)
    return found


def import_dicom(store: AnnotationStore, source: str | os.PathLike, *,
                 studies_dir: str | os.PathLike | None = None,
                 mapping: Mapping[str, str | None] | None = None, add_unknown: bool = False,
                 skip_duplicates: bool = True, notes: list[str] | None = None) -> Edit:
    """Add the boxes of an SR, GSPS or SEG file to ``store`` as one batch edit (see the module
    docstring). A model box keeps its model and score; the store records the importer. A SEG's
    anatomy segments (lungs, heart) are left out unless the project's label set holds them;
    ``notes`` (a list) receives the line saying how many were left out."""
    if studies_dir is not None and not Path(studies_dir).is_dir():
        raise DicomObjectError("not a folder (the images the boxes are drawn on)",
                               path=str(studies_dir))
    found = read_boxes(source)
    boxes, anatomy = split_anatomy(store, found.boxes)
    if not boxes:
        raise no_boxes_error(found, anatomy, source)
    unknown = [r for r in dict.fromkeys(b.referenced_sop_uid for b in boxes)  # (project's: no search)
               if r and store.find_study(StudyIdentity(f"{r}.dcm", sop_uid=r)) is None]
    files = find_dicom_files(studies_dir, unknown) if studies_dir is not None and unknown else {}
    with store.batch(f"import {Path(source).name}") as batch:
        wanted = {id(b): _project_label(store, b) for b in boxes}
        names = resolve_classes(store, wanted.values(), source, mapping=mapping,
                                add_unknown=add_unknown)
        sids: dict[str | None, int] = {}
        for box in boxes:
            ref, label = box.referenced_sop_uid, names[wanted[id(box)]]
            if label is None:
                continue
            if ref not in sids:
                sids[ref] = _study(store, ref, files.get(ref or ""), source, studies_dir)
            key = (label, box.x, box.y, box.w, box.h)
            if skip_duplicates and key in {(b.label, b.x, b.y, b.w, b.h)
                                           for b in store.boxes(sids[ref])}:
                continue
            model = box.source == "model" and bool(box.model_name)
            store.add_box(sids[ref], label, box.x, box.y, box.w, box.h,
                          source="model" if model else "manual",
                          model_name=box.model_name if model else None,
                          score=box.score if model else None)
    assert batch.edit is not None
    if anatomy and notes is not None:
        notes.append(anatomy_note(anatomy))
    return batch.edit


def _study(store: AnnotationStore, ref: str | None, file: Path | None,
           source: str | os.PathLike, studies_dir: str | os.PathLike | None) -> int:
    try:
        return _study_for(store, ref, None, file, str(source))
    except DicomObjectError as exc:
        if file is not None:
            raise
        where = (f"no DICOM file under {studies_dir} is that image (open the image once, or "
                 "name the folder holding it)" if studies_dir is not None
                 else "give the folder of the DICOM images it references (--studies DIR)")
        raise DicomObjectError(f"the image the boxes are drawn on ({ref or 'not named'}) is not "
                               f"in the project; {where}", path=str(source)) from exc


def _exporter(fmt: str):
    def export(store: AnnotationStore, target: str | os.PathLike, *,
               include_identifiers: bool = False,
               status: str | Iterable[str] | None = None) -> Path:
        return export_dicom(store, target, kinds=EXPORT_KINDS[fmt], status=status).folder
    export.__doc__ = f"Export format {fmt!r} for :data:`EXPORTERS` (see :func:`export_dicom`)."
    return export


def register_formats() -> None:
    """Put the DICOM formats in the annotation ``EXPORTERS``/``IMPORTERS`` (idempotent; done on
    import of this module too). ``dicom-seg`` export needs the project's masks and maps: it is
    registered by :mod:`cxrviewer.core.seg_export`."""
    EXPORTERS.update({fmt: _exporter(fmt) for fmt in EXPORT_KINDS if fmt != "dicom-seg"})
    IMPORTERS.update({"dicom-sr": import_dicom, "gsps": import_dicom, "dicom-seg": import_dicom})


register_formats()
