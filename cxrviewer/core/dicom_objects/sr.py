"""TID 1500 Measurement Report (Comprehensive 3D SR) of a study's accepted boxes.

One planar ROI measurement group (TID 1410) per box:

* the region: a closed ``POLYLINE`` (5 points: top-left, top-right, bottom-right, bottom-left,
  top-left) in the source image's pixel coordinates (SCOORD: the top-left corner of the top-left
  pixel is ``0,0``, the same pixel-edge coordinates the store keeps), referencing the source
  SOP Instance;
* Tracking Identifier ``Cornerstone3DTools@^0.1.0:RectangleROI`` (what OHIF needs to show the
  group as an editable rectangle, not only in its SR viewport) and a Tracking UID per box, stable
  across exports of the same box (derived from the source UID, box id and creation time);
* an Area measurement (mm² where the source has a usable Pixel Spacing, else pixels) with the
  rectangle as its INFERRED FROM coordinates: OHIF's SR adapters before Cornerstone3D 3.x look the
  geometry up under the group's first NUM;
* the class as Finding Type (SNOMED CT where one exists, else the private scheme ``99CXRV``),
  Finding Category "Finding";
* provenance: a qualitative evaluation ``99CXRV PROV`` = drawn by an annotator / model proposal
  accepted; the box's annotator as a person observer context of the group; for a model's box the
  model as Algorithm Identification (TID 4019) and its score as a measurement ``99CXRV SCORE``.

The document's observer context is the exporting person and cxrviewer as the device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..annotations.model import AnnotatedBox
from ._common import (
    ACCEPTED_MODEL, MANUAL, MANUFACTURER, NO_UNITS, PROVENANCE, SCORE, SERIES_NUMBERS,
    DicomObjectError, SourceImage, finding_code, mark_private_scheme, person_name,
    stable_uid,
)

#: Tracking Identifier text OHIF (Cornerstone3D's SR adapters) hydrates as a rectangle tool.
OHIF_RECTANGLE = "Cornerstone3DTools@^0.1.0:RectangleROI"
#: Algorithm version written for a model whose version the store does not record.
UNKNOWN_VERSION = "unspecified"
#: The device UID of cxrviewer as an observer (stable, derived from its name).
#: Unit of an area where the source has no usable pixel spacing (a UCUM annotation: unity).
PIXELS = Code("{pixels}", "UCUM", "pixels")
DEVICE_UID = stable_uid("cxrviewer device observer")


def rectangle_polyline(x: float, y: float, w: float, h: float) -> np.ndarray:
    """The closed 5-point polyline of a box: TL, TR, BR, BL, TL as ``[[column, row], ...]``."""
    x0, y0, x1, y1 = float(x), float(y), float(x) + float(w), float(y) + float(h)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def box_tracking_uid(source_uid: str, box: AnnotatedBox) -> str:
    """A Tracking UID that stays the same for the same box across exports."""
    return stable_uid("cxrviewer box", str(source_uid), str(box.id), str(box.created))


def _observer(name: str) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=person_name(name)))


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """The source's Pixel Spacing (row, column mm) when it is usable (some CRs write ``0\\0``)."""
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 and math.isfinite(row * col) else None


def _area(box: AnnotatedBox, source: SourceImage) -> hd.sr.Measurement:
    """The box's area (computed by cxrviewer): mm² with a usable Pixel Spacing, else pixels."""
    spacing = _spacing(source.dataset)
    area = float(box.w) * float(box.h)
    unit = PIXELS
    if spacing is not None:
        area, unit = area * spacing[0] * spacing[1], codes.UCUM.SquareMillimeter
    return hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=unit)


def _infer_area_from_rectangle(group: Dataset, box: AnnotatedBox,
                               image: hd.sr.SourceImageForRegion) -> None:
    """Put the rectangle under the group's first NUM (the area) as INFERRED FROM coordinates.

    OHIF's SR adapters (all Cornerstone3D versions before 3.x, and later ones when the group
    has any NUM) look a rectangle's geometry up under the group's first NUM; TID 1410 is
    extensible, highdicom does not add this item itself."""
    num = next(it for it in group.ContentSequence if it.ValueType == "NUM")
    coords = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=rectangle_polyline(box.x, box.y, box.w, box.h), source_image=image)
    if "ContentSequence" not in num:
        num.ContentSequence = []
    num.ContentSequence.append(coords)


def box_group(box: AnnotatedBox, source: SourceImage
              ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 measurement group of one accepted box (see the module docstring)."""
    image = hd.sr.SourceImageForRegion.from_source_image(source.dataset)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=rectangle_polyline(box.x, box.y, box.w, box.h), source_image=image)
    model = box.source == "model"
    algo = (hd.sr.AlgorithmIdentification(name=str(box.model_name)[:64], version=UNKNOWN_VERSION)
            if model else None)
    measurements = [_area(box, source)]  # first NUM: OHIF reads the geometry there
    if model and box.score is not None:
        measurements.append(hd.sr.Measurement(name=SCORE, value=float(box.score), unit=NO_UNITS,
                                              algorithm_id=algo))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=box_tracking_uid(source.sop_uid, box), identifier=OHIF_RECTANGLE),
        referenced_region=region,
        finding_type=finding_code(box.label),
        finding_category=codes.SCT.Finding,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            PROVENANCE, ACCEPTED_MODEL if model else MANUAL)])
    _infer_area_from_rectangle(group[0], box, image)
    group[0].ContentSequence.extend(_observer(box.annotator))
    return group


def box_report(source: SourceImage, boxes: Sequence[AnnotatedBox], *,
               exported_by: str) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR (TID 1500) of ``boxes`` on ``source`` (new series and UIDs).

    ``exported_by``: the person observer of the document. Raises :class:`DicomObjectError`
    when there is no box.
    """
    if not boxes:
        raise DicomObjectError("the study has no accepted boxes to report", path=source.path)
    context = hd.sr.ObservationContext(
        observer_person_context=_observer(exported_by),
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=DEVICE_UID, name=MANUFACTURER, manufacturer_name=MANUFACTURER)))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.SCT.PlainRadiography,
        imaging_measurements=[box_group(b, source) for b in boxes])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source.dataset], content=report[0], series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = "cxrviewer boxes (TID 1500)"
    mark_private_scheme(sr)
    return sr
