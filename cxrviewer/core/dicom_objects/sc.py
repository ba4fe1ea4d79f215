"""Secondary Capture of a non-DICOM study (PNG/JPEG/NIH), so SR/SEG/GSPS can reference it.

The capture holds the study's *stored* pixel values unchanged (8 or 16 bit, MONOCHROME2), gets
new Study/Series/SOP Instance UIDs and carries no patient identifier: a PNG has none, and none is
made up (Patient Name/ID are present but empty, as DICOM's type 2 allows). It is marked derived:
Image Type ``DERIVED\\SECONDARY``, Conversion Type ``WSD`` (workstation) and a Derivation
Description naming the source file's base name.
"""
from __future__ import annotations

from pathlib import PurePath

import highdicom as hd
import numpy as np

from ..study import Study
from ._common import MANUFACTURER, SERIES_NUMBERS, DicomObjectError, SourceImage


def secondary_capture(study: Study, *, study_uid: str | None = None) -> SourceImage:
    """A Secondary Capture image of ``study``'s stored pixels (see the module docstring).

    ``study_uid``: the Study Instance UID to file it under (default: a new one). Raises
    :class:`DicomObjectError` for a DICOM study (reference the original instead) or pixels
    that are not 8/16-bit grey.
    """
    if study.meta.format == "dicom":
        raise DicomObjectError("the study is DICOM already: reference it, not a capture of it",
                               path=study.meta.source_path)
    pixels = np.ascontiguousarray(study.stored)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise DicomObjectError(f"cannot capture {pixels.dtype} pixels (8/16-bit grey only)",
                               path=study.meta.source_path)
    name = PurePath(study.meta.source_path).name
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2",
        bits_allocated=8 * pixels.dtype.itemsize, coordinate_system="PATIENT",
        study_instance_uid=study_uid or hd.UID(), series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["sc"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"))
    sc.PatientOrientation = ""  # type 2: unknown for a plain raster (not made up)
    sc.Laterality = ""  # type 2C: a chest image is of no one side
    sc.ConversionType = "WSD"
    sc.Modality = "OT"
    sc.DerivationDescription = f"Secondary capture by cxrviewer of the non-DICOM image {name}"[:1024]
    sc.ImageComments = "Derived: converted from a non-DICOM image; not an original acquisition"
    sc.SeriesDescription = "cxrviewer secondary capture (derived)"
    return SourceImage(sc, None, derived=True)
