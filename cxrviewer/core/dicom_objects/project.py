"""Writing a project study's DICOM objects: the source image, then SR, GSPS and SEGs."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..annotations.store import AnnotationStore
from ..io import load_study
from ..errors import CxrError
from ._common import DicomObjectError, SourceImage, read_source_header, write_dataset
from .gsps import box_presentation_state
from .sc import secondary_capture
from .seg import Thresholded, binary_segmentation, fractional_segmentation, thresholds_segmentation
from .sr import box_report

#: File names :func:`export_study` writes into its folder.
FILE_NAMES = {"sc": "SC.dcm", "sr": "SR.dcm", "gsps": "PR.dcm", "seg": "SEG.dcm",
              "threshold": "SEG_threshold.dcm", "fractional": "SEG_fractional.dcm"}


def study_source(store: AnnotationStore, study_id: int) -> SourceImage:
    """The image a study's objects reference: the DICOM file's header (checked to be the same
    SOP Instance), or for a PNG/JPEG/NIH study a new Secondary Capture of its pixels (checked
    against the project's content hash). Raises :class:`DicomObjectError` when the file is
    missing or is no longer that image."""
    rec = store.study(study_id)
    if not rec.path:
        raise DicomObjectError(f"study {study_id} has no known file; open the image in cxrviewer "
                               "once so the project learns where it is")
    if rec.identity.sop_uid:
        head = read_source_header(rec.path)
        if str(head.SOPInstanceUID) != rec.identity.sop_uid:
            raise DicomObjectError(f"the file is image {head.SOPInstanceUID}, not the project's "
                                   f"{rec.identity.sop_uid}", path=rec.path)
        return SourceImage(head, rec.path)
    try:
        study = load_study(rec.path)
    except CxrError as exc:
        raise DicomObjectError(f"cannot load the image for a secondary capture ({exc})",
                               path=rec.path) from exc
    if rec.identity.sha256 and study.pixel_sha256() != rec.identity.sha256:
        raise DicomObjectError("the file's pixels differ from the annotated image's",
                               path=rec.path)
    if study.shape != (rec.height, rec.width):
        raise DicomObjectError(f"the file is {study.shape[1]}x{study.shape[0]}, the project's "
                               f"study {rec.width}x{rec.height}", path=rec.path)
    return secondary_capture(study)


def export_study(store: AnnotationStore, study_id: int, folder: str | os.PathLike, *,
                 masks: Mapping[str, np.ndarray] | None = None,
                 fractional: Mapping[str, np.ndarray] | None = None,
                 thresholded: Thresholded | Sequence[Thresholded] | None = None,
                 algorithm: str | None = None, map_algorithm: str | None = None,
                 boxes: bool = True) -> dict[str, Path]:
    """Write a study's DICOM objects into ``folder`` (names: :data:`FILE_NAMES`) and return
    ``{kind: path}``.

    ``SC.dcm`` first for a non-DICOM study (the others reference it); ``SR.dcm`` and ``PR.dcm``
    (GSPS) of the accepted boxes when ``boxes`` and the study has any; ``SEG.dcm`` of ``masks``
    (binary, e.g. lung/heart from the segmentation bundle); ``SEG_threshold.dcm`` of
    ``thresholded = (name, map, threshold)`` or a list of them (one segment each);
    ``SEG_fractional.dcm`` of ``fractional`` maps in [0, 1]. ``algorithm``: the model that made
    the masks (and the maps, unless ``map_algorithm`` names another). Each file is written
    atomically.
    Raises :class:`DicomObjectError` when nothing would be written.
    """
    source = study_source(store, study_id)
    found = store.boxes(study_id) if boxes else []
    objects = {}
    if found:
        objects["sr"] = box_report(source, found, exported_by=store.annotator)
        objects["gsps"] = box_presentation_state(source, found, exported_by=store.annotator)
    if masks:
        objects["seg"] = binary_segmentation(source, masks, algorithm=algorithm)
    if thresholded is not None and len(thresholded):
        items = [thresholded] if isinstance(thresholded[0], str) else list(thresholded)
        objects["threshold"] = thresholds_segmentation(source, items,
                                                       algorithm=map_algorithm or algorithm)
    if fractional:
        objects["fractional"] = fractional_segmentation(source, fractional,
                                                        algorithm=map_algorithm or algorithm)
    if not objects:
        raise DicomObjectError(f"study {study_id}: nothing to write (no accepted boxes, masks or "
                               "maps)")
    if source.derived:
        objects = {"sc": source.dataset, **objects}
    out = Path(folder)
    return {kind: write_dataset(ds, out / FILE_NAMES[kind]) for kind, ds in objects.items()}
