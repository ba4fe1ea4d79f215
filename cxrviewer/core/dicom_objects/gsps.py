"""Grayscale Softcopy Presentation State with a study's boxes as graphic annotations.

For viewers that show presentation states (Weasis, many PACS viewers) but not SR measurements.
One graphic layer per class (layer name ``CXRV1``, ``CXRV2`` ..., its description the class
name); each box is a closed 5-point ``POLYLINE`` in ``PIXEL`` units (top-left corner of the
top-left pixel = ``0,0``, as the store keeps boxes) with the box's Tracking UID, plus a text
object above it reading ``<class> [manual: <annotator>]`` or
``<class> [model: <model>, score <score>, accepted by <annotator>]``; :mod:`.read` parses that back.
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd

from ..annotations.model import AnnotatedBox
from ._common import (
    DEVICE_SERIAL, MANUFACTURER, MODEL_NAME, SERIES_NUMBERS, SOFTWARE_VERSION, DicomObjectError,
    SourceImage, mark_private_scheme, person_name,
)
from .sr import box_tracking_uid, rectangle_polyline

#: Content Label of the presentation states cxrviewer writes (how :mod:`.read` knows its own).
CONTENT_LABEL = "CXRVIEWER_BOXES"


def box_text(box: AnnotatedBox) -> str:
    """The label shown beside a box: class and provenance (see the module docstring)."""
    who = person_name(box.annotator)[:-1]
    if box.source == "model":
        score = "" if box.score is None else f", score {float(box.score)!r}"
        return f"{box.label} [model: {box.model_name}{score}, accepted by {who}]"
    return f"{box.label} [manual: {who}]"


def _annotation(box: AnnotatedBox, source: SourceImage, layer: hd.pr.GraphicLayer
                ) -> hd.pr.GraphicAnnotation:
    uid = box_tracking_uid(source.sop_uid, box)
    rows, cols = int(source.dataset.Rows), int(source.dataset.Columns)
    anchor = (min(max(box.x, 0.0), float(cols)), min(max(box.y, 0.0), float(rows)))
    shape = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
        graphic_data=rectangle_polyline(box.x, box.y, box.w, box.h),
        units=hd.pr.AnnotationUnitsValues.PIXEL, tracking_id=f"box {box.id}", tracking_uid=uid)
    text = hd.pr.TextObject(
        text_value=box_text(box)[:1024], units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=anchor, anchor_point_visible=False,
        text_justification=hd.pr.TextJustificationValues.LEFT)
    return hd.pr.GraphicAnnotation(referenced_images=[source.dataset], graphic_layer=layer,
                                   graphic_objects=[shape], text_objects=[text])


def box_presentation_state(source: SourceImage, boxes: Sequence[AnnotatedBox], *,
                           exported_by: str) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS of ``boxes`` on ``source`` (new series and UIDs); raises
    :class:`DicomObjectError` when there is no box."""
    if not boxes:
        raise DicomObjectError("the study has no accepted boxes to draw", path=source.path)
    classes = list(dict.fromkeys(b.label for b in boxes))
    layers = {c: hd.pr.GraphicLayer(layer_name=f"CXRV{i + 1}", order=i + 1, description=c[:64])
              for i, c in enumerate(classes)}
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source.dataset], series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["pr"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION, device_serial_number=DEVICE_SERIAL,
        content_label=CONTENT_LABEL, content_description="cxrviewer boxes",
        graphic_annotations=[_annotation(b, source, layers[b.label]) for b in boxes],
        graphic_layers=list(layers.values()), content_creator_name=person_name(exported_by))
    pr.SeriesDescription = "cxrviewer boxes (presentation state)"
    pr.Laterality = getattr(source.dataset, "Laterality", None) or ""
    mark_private_scheme(pr)
    return pr
