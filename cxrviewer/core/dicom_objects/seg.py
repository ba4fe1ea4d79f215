"""DICOM Segmentations of a study: binary masks, thresholded maps and fractional maps.

Masks and maps are 2-D arrays with the source image's shape (rows, columns). Each becomes one
segment; its label is the array's name. Anatomy names (``lung``, ``left lung``, ``heart`` ...)
get SNOMED CT anatomy codes; any other name is a finding (SNOMED CT where one exists, else the
private scheme ``99CXRV``). A thresholded map records its threshold in the segment label and
the series description ("Cardiomegaly CAM >= 0.5"). Segments that are empty are kept (an empty
lung mask is information, not nothing), so segment numbers follow the order given.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ._common import (
    DEVICE_SERIAL, MANUFACTURER, MODEL_NAME, SERIES_NUMBERS, SOFTWARE_VERSION,
    DicomObjectError, SourceImage, anatomy_code, finding_code, mark_private_scheme,
)


def to_image_size(arr: np.ndarray, shape: tuple[int, int], *, binary: bool) -> np.ndarray:
    """``arr`` (2-D, e.g. a mask or map stored at the explainer's ``map_shape``) resampled to the
    image's ``(rows, columns)``: nearest neighbour for a mask (``binary``: pixel-centre sampling,
    values kept exactly), bilinear for a map (float32)."""
    a = np.asarray(arr)
    rows, cols = int(shape[0]), int(shape[1])
    if a.ndim != 2 or a.size == 0 or rows <= 0 or cols <= 0:
        raise DicomObjectError(f"cannot resample a {a.shape} array to {rows}x{cols}")
    if a.shape == (rows, cols):
        return a.copy()
    if binary:
        ri = np.minimum(((np.arange(rows) + 0.5) * a.shape[0] / rows).astype(np.int64), a.shape[0] - 1)
        ci = np.minimum(((np.arange(cols) + 0.5) * a.shape[1] / cols).astype(np.int64), a.shape[1] - 1)
        return a[ri[:, None], ci[None, :]]
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.BILINEAR), dtype=np.float32)


def segments_from_stack(stack: np.ndarray, names: Sequence[str], shape: tuple[int, int],
                        threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``{name: bool mask at the image size}`` from an explainer's ``[n, h, w]`` mask stack (the
    segmentation explainer's ``masks`` with its ``classes`` names: left lung, right lung,
    heart), thresholded at ``threshold`` then resampled (nearest)."""
    arr = np.asarray(stack)
    if arr.ndim != 3 or arr.shape[0] != len(names):
        raise DicomObjectError(f"a mask stack of {arr.shape} does not match {len(names)} names")
    return {str(n): to_image_size(arr[i] >= threshold, shape, binary=True)
            for i, n in enumerate(names)}


def _description(number: int, name: str, algorithm: str | None,
                 concept: str | None = None) -> hd.seg.SegmentDescription:
    """Segment ``number`` labelled ``name``, coded as ``concept`` (default: ``name``): anatomy
    names get SNOMED CT anatomy codes, anything else a finding code."""
    concept = name if concept is None else concept
    anatomy = anatomy_code(concept)
    category = codes.SCT.AnatomicalStructure if anatomy else codes.SCT.MorphologicallyAbnormalStructure
    kind = anatomy or finding_code(concept)
    algo = None
    if algorithm:
        algo = hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], version="unspecified", family=codes.cid7162.ArtificialIntelligence)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type="AUTOMATIC" if algorithm else "MANUAL", algorithm_identification=algo)


def _stack(source: SourceImage, arrays: Mapping[str, np.ndarray], what: str) -> np.ndarray:
    """``[1, rows, columns, segments]`` of the arrays, each checked against the source's size."""
    if not arrays:
        raise DicomObjectError(f"no {what} to write", path=source.path)
    shape = (int(source.dataset.Rows), int(source.dataset.Columns))
    planes = []
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.shape != shape:
            raise DicomObjectError(f"{what} {name!r} is {a.shape[0]}x{a.shape[1] if a.ndim > 1 else 1}"
                                   f", the image {shape[0]}x{shape[1]}", path=source.path)
        planes.append(a)
    return np.stack(planes, axis=-1)[None]


def _usable(source: SourceImage) -> Dataset:
    """The source header with a zero or malformed Pixel Spacing left out (some CR writers put
    ``0\\0`` there); the SEG then states no spacing rather than a wrong one."""
    ds = source.dataset
    try:
        ok = all(float(v) > 0 for v in ds.PixelSpacing) and len(ds.PixelSpacing) == 2
    except (AttributeError, TypeError, ValueError):
        ok = "PixelSpacing" not in ds
    if ok:
        return ds
    ds = copy.copy(ds)
    del ds.PixelSpacing
    return ds


def _segmentation(source: SourceImage, pixels: np.ndarray, names: list[str], kind: str,
                  algorithm: str | None, description: str,
                  concepts: Sequence[str] | None = None, series: str | None = None
                  ) -> hd.seg.Segmentation:
    concepts = list(names) if concepts is None else list(concepts)
    seg = hd.seg.Segmentation(
        source_images=[_usable(source)], pixel_array=pixels, segmentation_type=kind,
        segment_descriptions=[_description(i + 1, n, algorithm, c)
                              for i, (n, c) in enumerate(zip(names, concepts))],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS[series or ("fseg" if kind == "FRACTIONAL" else "seg")],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=SOFTWARE_VERSION,
        device_serial_number=DEVICE_SERIAL, omit_empty_frames=False,
        content_description=description[:64], content_label="CXRVIEWER")
    seg.SeriesDescription = description[:64]
    seg.PatientOrientation = getattr(source.dataset, "PatientOrientation", None) or ""
    mark_private_scheme(seg)
    return seg


def binary_segmentation(source: SourceImage, masks: Mapping[str, np.ndarray], *,
                        algorithm: str | None = None) -> hd.seg.Segmentation:
    """A binary SEG with one segment per mask (non-zero = inside).

    ``algorithm``: the model (e.g. the segmentation bundle's name) when the masks were computed,
    ``None`` for masks drawn by hand.
    """
    pixels = _stack(source, masks, "mask") != 0
    return _segmentation(source, pixels.astype(np.uint8), list(masks), "BINARY", algorithm,
                         "cxrviewer masks: " + ", ".join(masks))


#: one thresholded map: ``(class name, map at the image size, threshold)``
Thresholded = tuple[str, np.ndarray, float]


def threshold_segmentation(source: SourceImage, name: str, values: np.ndarray, threshold: float,
                           *, algorithm: str | None = None) -> hd.seg.Segmentation:
    """A binary SEG of ``values >= threshold`` (e.g. a class's CAM); the threshold is written
    into the segment label, the Segment Description and the series description."""
    return thresholds_segmentation(source, [(name, values, threshold)], algorithm=algorithm)


def thresholds_segmentation(source: SourceImage, maps: Sequence[Thresholded], *,
                            algorithm: str | None = None) -> hd.seg.Segmentation:
    """A binary SEG with one segment per ``(class name, map, threshold)``: ``map >= threshold``.

    Each segment is coded as its class (the finding, as in the SR), labelled ``"<class> >=
    <threshold>"`` and described ``"<class> map thresholded: pixels with value >= <t>"``, so
    the threshold is recorded in the object."""
    labels, planes = {}, {}
    for name, values, threshold in maps:
        if not np.isfinite(threshold):
            raise DicomObjectError(f"threshold {threshold!r} is not a number", path=source.path)
        label = f"{name} >= {threshold:g}"
        if label in labels:
            raise DicomObjectError(f"map {label!r} given twice", path=source.path)
        labels[label] = (name, float(threshold))
        planes[label] = np.asarray(values)
    pixels = _stack(source, planes, "map")
    pixels = pixels >= np.asarray([t for _, t in labels.values()], dtype=np.float64)
    seg = _segmentation(source, pixels.astype(np.uint8), list(labels), "BINARY", algorithm,
                        "cxrviewer map " + ", ".join(labels),
                        concepts=[n for n, _ in labels.values()], series="tseg")
    for item, (name, threshold) in zip(seg.SegmentSequence, labels.values()):
        item.SegmentDescription = f"{name} map thresholded: pixels with value >= {threshold!r}"[:64]
    return seg


def fractional_segmentation(source: SourceImage, maps: Mapping[str, np.ndarray], *,
                            algorithm: str | None = None) -> hd.seg.Segmentation:
    """A fractional (probability) SEG, one segment per map; values must lie in ``[0, 1]`` (stored
    as 0..255, so a read back is within 1/510 of the map)."""
    pixels = _stack(source, maps, "map").astype(np.float32)
    if not np.all(np.isfinite(pixels)) or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise DicomObjectError("a fractional map must hold values in [0, 1] (normalise it first)",
                               path=source.path)
    return _segmentation(source, pixels, list(maps), "FRACTIONAL", algorithm,
                         "cxrviewer maps: " + ", ".join(maps))
