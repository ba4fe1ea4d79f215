"""Shared pieces of the DICOM writers and readers: errors, codes, source headers, atomic writes."""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..annotations.export import atomic_write
from ..errors import ExportError
from ..labelsets import NIH14, normalise

#: Manufacturer written into every object (Equipment module).
MANUFACTURER = "cxrviewer"
#: Model name / software version written into every object.
MODEL_NAME = "cxrviewer"
SOFTWARE_VERSION = "cxrviewer 0.1"
#: The device serial number highdicom requires; cxrviewer is software, it has none.
DEVICE_SERIAL = "none"
#: Private coding scheme for findings and provenance with no SNOMED CT / DCM code. Every code of
#: this scheme is ours alone ("99" prefix = private scheme designator, PS3.16 section 8.2).
PRIVATE_SCHEME = "99CXRV"
#: Series numbers of the objects cxrviewer writes (new series each, numbered apart from the
#: acquisition's own series).
SERIES_NUMBERS = {"sc": 9900, "sr": 9901, "seg": 9902, "fseg": 9903, "pr": 9904, "tseg": 9905}
#: Header values longer than this are not read from a source file (pixels are never read).
DEFER_SIZE = 64 * 1024
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}


class DicomObjectError(ExportError):
    """A DICOM object cannot be written or read (no boxes, no source image, not one of ours...)."""


#: Name space of the UUID-derived (``2.25.``) UIDs cxrviewer derives from names.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cxrviewer/dicom-objects")


def stable_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (``2.25.`` + a name-based UUID, PS3.5 B.2): the same parts
    give the same UID in every export, different parts a different one."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


def private_code(value: str, meaning: str) -> Code:
    """A code of the private scheme :data:`PRIVATE_SCHEME`."""
    return Code(value, PRIVATE_SCHEME, meaning)


#: NIH ChestX-ray14 findings with a SNOMED CT code in the DICOM content mapping resource (as
#: shipped in pydicom's code dictionary); the others get :func:`finding_code`'s private code.
SCT_FINDINGS: dict[str, Code] = {
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Effusion": codes.SCT.PleuralEffusion,
    "Pleural effusion": codes.SCT.PleuralEffusion,
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Mass": codes.SCT.Mass,
    "Nodule": codes.SCT.Nodule,
    "Edema": codes.SCT.PulmonaryEdema,
    "Fibrosis": codes.SCT.Fibrosis,
    "Pulmonary fibrosis": codes.SCT.Fibrosis,
}
#: Anatomy a mask can name (segment label, case-insensitive) -> SNOMED CT code.
ANATOMY: dict[str, Code] = {
    "lung": codes.SCT.Lung, "lungs": codes.SCT.Lung, "left lung": codes.SCT.Lung,
    "right lung": codes.SCT.Lung, "heart": codes.SCT.Heart,
}
#: Provenance codes (private): the concept and its two values.
PROVENANCE = private_code("PROV", "Box provenance")
MANUAL = private_code("MANUAL", "Drawn by an annotator")
ACCEPTED_MODEL = private_code("MODEL", "Model proposal accepted by an annotator")
SCORE = private_code("SCORE", "Model score")
NO_UNITS = Code("1", "UCUM", "no units")


#: the two tables by :func:`cxrviewer.core.labelsets.normalise`d name (case, ``_``/``-``/spaces
#: not told apart: a segmentation bundle's ``left_lung`` is "left lung")
_SCT_BY_NAME = {normalise(k): v for k, v in SCT_FINDINGS.items()}
_ANATOMY_BY_NAME = {normalise(k): v for k, v in ANATOMY.items()}


def anatomy_code(name: str) -> Code | None:
    """The SNOMED CT code of an anatomical structure a mask names (None if not one of :data:`ANATOMY`)."""
    return _ANATOMY_BY_NAME.get(normalise(name))


def finding_code(label: str) -> Code:
    """The coded finding of a class: SNOMED CT where one exists (any spelling or NIH synonym of a
    :data:`SCT_FINDINGS` name), else ``99CXRV`` with the class name as the meaning (code value:
    ``F`` + 12 hex digits of the name's SHA-1, stable)."""
    code = _SCT_BY_NAME.get(normalise(label)) or _SCT_BY_NAME.get(normalise(NIH14.canonical(label) or ""))
    if code is not None:
        return code
    digest = hashlib.sha1(label.encode("utf-8")).hexdigest()[:12].upper()
    return private_code("F" + digest, label[:64])


def label_of_code(value: str, scheme: str, meaning: str) -> str:
    """The class name a coded finding stands for: ours for a SNOMED CT code of
    :data:`SCT_FINDINGS` (its first, NIH, spelling), else the code meaning."""
    for label, code in SCT_FINDINGS.items():
        if scheme != PRIVATE_SCHEME and (code.value, code.scheme_designator) == (value, scheme):
            return label
    return " ".join(str(meaning).split())


@dataclass(frozen=True)
class SourceImage:
    """The image the written objects refer to: its header (no pixels), where it came from, and
    whether it is a Secondary Capture cxrviewer made of a non-DICOM image."""

    dataset: Dataset
    path: str | None
    derived: bool = False

    @property
    def sop_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def read_source_header(path: str | os.PathLike) -> Dataset:
    """The DICOM header of ``path`` (pixel data not read, long values deferred).

    Raises :class:`DicomObjectError` for a file that is not DICOM, lacks the UIDs the objects
    must reference, or is deflated (refused, as by the study loader)."""
    p = str(path)
    try:
        meta = pydicom.filereader.read_file_meta_info(p)
        if str(getattr(meta, "TransferSyntaxUID", "")) in _DEFLATED:
            raise DicomObjectError("deflated DICOM files are not supported as a source", path=p)
        ds = pydicom.dcmread(p, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except DicomObjectError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad input
        raise DicomObjectError(f"cannot read the source DICOM header ({_one_line(exc)})",
                               path=p) from exc
    for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
               "Rows", "Columns"):
        if not getattr(ds, kw, None):
            raise DicomObjectError(f"the source DICOM has no {kw}", path=p)
    return ds


def write_dataset(ds: Dataset, target: str | os.PathLike) -> Path:
    """Write ``ds`` as a DICOM Part 10 file atomically (temp file beside, fsync, replace)."""
    def fill(fh) -> None:
        ds.save_as(fh, enforce_file_format=True)
    try:
        return atomic_write(target, fill)
    except ExportError as exc:
        raise DicomObjectError(str(exc).split(": ", 1)[-1], path=str(target)) from exc


def _one_line(exc: object, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def person_name(name: str | None) -> str:
    """A PN value for an annotator's name: delimiters removed, at most 60 characters, with a
    trailing ``^`` (a single-component name, as DICOM asks it to be written)."""
    clean = " ".join(str(name or "unknown").replace("^", " ").replace("=", " ").replace(
        "\\", " ").split())
    return (clean or "unknown")[:60] + "^"


def mark_private_scheme(ds: Dataset) -> Dataset:
    """Declare the private coding scheme :data:`PRIVATE_SCHEME` in ``ds`` (Coding Scheme
    Identification Sequence), so a reader knows whose codes ``99CXRV`` are."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "cxrviewer private codes (findings without a SNOMED CT code, provenance)"
    item.CodingSchemeResponsibleOrganization = "cxrviewer"
    seq = [i for i in getattr(ds, "CodingSchemeIdentificationSequence", [])
           if getattr(i, "CodingSchemeDesignator", None) != PRIVATE_SCHEME]
    ds.CodingSchemeIdentificationSequence = [*seq, item]
    return ds
