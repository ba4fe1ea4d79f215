"""DICOM objects out and back in (Qt-free): SR, SEG, GSPS, Secondary Capture, and readers.

Out, for one study of an annotation project (:func:`export_study` writes them all):

* :func:`box_report` - TID 1500 Comprehensive 3D SR of the accepted boxes (OHIF rectangles);
* :func:`box_presentation_state` - GSPS with the boxes as graphic annotations (Weasis, PACS);
* :func:`binary_segmentation`, :func:`threshold_segmentation`, :func:`fractional_segmentation`
  (:func:`segments_from_stack` / :func:`to_image_size` bring explainer masks/maps to image size);
* :func:`secondary_capture` - for PNG/JPEG/NIH studies, the DICOM image the others reference.

In: :func:`read_boxes` (SR, GSPS or SEG, ours or another tool's) -> :class:`BoxRecord` list;
:func:`import_boxes` adds them to a project; :func:`read_segmentation` gives a SEG's masks.
Everything written gets new UIDs; patient/study context is copied only from the source image.
Errors are :class:`DicomObjectError` (an :class:`~cxrviewer.core.errors.ExportError`).
"""
from ._common import DicomObjectError, SourceImage, finding_code, read_source_header, write_dataset
from .gsps import box_presentation_state
from .project import FILE_NAMES, export_study, study_source
from .read import BoxRecord, DicomBoxes, import_boxes, read_boxes, read_segmentation
from .sc import secondary_capture
from .seg import (
    binary_segmentation, fractional_segmentation, segments_from_stack, threshold_segmentation,
    thresholds_segmentation, to_image_size,
)
from .sr import OHIF_RECTANGLE, box_report

__all__ = [
    "BoxRecord", "DicomBoxes", "DicomObjectError", "FILE_NAMES", "OHIF_RECTANGLE", "SourceImage",
    "binary_segmentation", "box_presentation_state", "box_report", "export_study",
    "finding_code", "fractional_segmentation", "import_boxes", "read_boxes", "read_segmentation",
    "read_source_header", "secondary_capture", "segments_from_stack", "study_source",
    "threshold_segmentation", "thresholds_segmentation", "to_image_size", "write_dataset",
]
