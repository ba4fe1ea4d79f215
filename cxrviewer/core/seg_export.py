"""DICOM SEG export of an annotation project: each study's lung/heart masks and finding maps.

The code behind ``cxrviewer export PROJECT --format dicom-seg --out DIR`` and the annotation
project's "DICOM SEG" export menu entry. For every study of the project (a folder per study, as
the SR/GSPS export: :func:`cxrviewer.core.dicom_objects.exchange.export_dicom`, which also writes
the Secondary Capture a PNG/JPEG/NIH study needs first):

* ``SEG.dcm``: a binary SEG of the lung/heart masks. They come from the study's stored analysis
  (a ``results.h5`` whose pixel hash is the study's: beside the image, as the app looks for it,
  in the app's results cache, or in the folders/files given as ``results``, e.g. a
  ``cxrviewer analyze --out`` folder), else from running the bundled segmentation model
  (``resources/models/segmentation.cxrbundle``) through the pipeline with the segmentation role
  only (``run_model=False``: never).
* ``SEG_threshold.dcm`` and ``SEG_fractional.dcm`` when the stored analysis holds finding maps:
  for each class of the study's accepted boxes the classifier knows (else its most probable
  class), the first map of :data:`MAP_PREFERENCE` it has, in [0, 1] (probability maps as they
  are, score maps divided by their maximum), thresholded at ``threshold`` (recorded in the
  segment label and description) and as a fractional segment.

A study with neither stored results nor a segmentation model to run is skipped and listed.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .annotations.export import EXPORTERS
from .annotations.model import StudyRecord
from .annotations.store import AnnotationStore
from .dicom_objects._common import DicomObjectError
from .dicom_objects.exchange import EXPORT_KINDS, DicomExport, StudyInputs, export_dicom
from .dicom_objects.seg import segments_from_stack, to_image_size
from .errors import CxrError
from .io import load_study
from .io.results import read_results, results_summary
from .labelsets import NIH14, normalise
from .result_cache import CACHE_SHA_DIGITS, RESULTS_SUFFIXES, cache_sha_prefix, sidecar_candidates
from .results import Results
from .study import Study

#: the threshold of the thresholded maps (on maps brought to [0, 1])
DEFAULT_THRESHOLD = 0.5
#: the segmentation model run when a study has no stored masks (in ``resources/models``)
SEGMENTATION_BUNDLE = "segmentation.cxrbundle"
#: finding maps in order of preference: (explainer, map, already a probability in [0, 1])
MAP_PREFERENCE = (("disease_mask", "psi", True), ("cam", "cam", False),
                  ("gradcam", "gradcam", False), ("attention_mining", "final", False))


class ResultsIndex:
    """Finds a study's stored analysis by pixel hash: the files beside the image
    (:func:`~cxrviewer.core.result_cache.sidecar_candidates`), then the ``places`` (results
    files, folders of them, ``cxrviewer analyze`` output folders with ``*/results.h5``, the
    app's results cache). Folders are indexed once, on first use (no maps read); the app's cache
    files are indexed by the hash in their names (:func:`~cxrviewer.core.result_cache.cache_path`)
    and opened only when a study's hash matches, so an export does not open every cached analysis."""

    def __init__(self, places: Sequence[str | os.PathLike] = ()) -> None:
        self.places = [Path(p) for p in places]
        self._by_sha: dict[str, Path] | None = None
        self._by_prefix: dict[str, list[Path]] = {}

    def _index(self) -> dict[str, Path]:
        if self._by_sha is None:
            self._by_sha = {}
            for place in self.places:
                files = [place] if place.is_file() else sorted(
                    f for pattern in ("*/results.h5", "*.h5", "*.hdf5") for f in place.glob(pattern))
                for f in files:
                    prefix = cache_sha_prefix(f.name)
                    if prefix:
                        self._by_prefix.setdefault(prefix, []).append(f)
                    elif sha := _summary_sha(f):
                        self._by_sha.setdefault(sha, f)
        return self._by_sha

    def _indexed(self, sha: str) -> list[Path]:
        """The indexed files of the pixels ``sha`` (a cache file's name is checked against its
        summary before it counts)."""
        by_sha = self._index()
        named = [f for f in self._by_prefix.get(sha[:CACHE_SHA_DIGITS], []) if _summary_sha(f) == sha]
        return ([by_sha[sha]] if sha in by_sha else []) + named

    def find(self, study_path: str | os.PathLike, sha: str) -> tuple[Results, Path] | None:
        """The first stored analysis of the pixels ``sha`` and its file, or None. The files
        beside the image and ``PLACE/<image stem>/results.h5`` (``cxrviewer analyze``'s layout)
        are tried before the places are indexed whole."""
        stem = Path(study_path).stem
        guesses = [*sidecar_candidates(study_path),
                   *(d / stem / "results.h5" for d in self.places if d.is_dir())]
        cands = [p for p in guesses
                 if p.is_file() and p.suffix.lower() in RESULTS_SUFFIXES and _summary_sha(p) == sha]
        found = _first_readable(cands)
        if found is None:  # only now are the places indexed
            found = _first_readable([f for f in self._indexed(sha) if f not in cands])
        return found


def _first_readable(paths: Sequence[Path]) -> tuple[Results, Path] | None:
    for path in paths:
        try:
            return read_results(path), path
        except CxrError:
            continue
    return None


def _summary_sha(path: Path) -> str | None:
    try:
        return str(results_summary(path)["pixel_sha256"])
    except CxrError:
        return None


def _classes_for(store: AnnotationStore, rec: StudyRecord, res: Results) -> list[str]:
    """The classifier's classes to export maps of: those of the study's accepted boxes, else
    its most probable one."""
    known = {normalise(c): c for c in res.classes}
    picked: list[str] = []
    for box in store.boxes(rec.id):
        for name in (box.label, NIH14.canonical(box.label) or ""):
            cls = known.get(normalise(name))
            if cls and cls not in picked:
                picked.append(cls)
                break
    if not picked and res.top_classes(1):
        picked.append(res.classes[res.top_classes(1)[0]])
    return picked


def finding_maps(res: Results, classes: Sequence[str], shape: tuple[int, int]
                 ) -> dict[str, tuple[str, np.ndarray]]:
    """``{class: (map name, map in [0, 1] at the image size)}`` for each of ``classes`` with a
    map of :data:`MAP_PREFERENCE` (a score map is divided by its maximum; an all-negative one
    is left out)."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for cls in classes:
        for explainer, name, probability in MAP_PREFERENCE:
            stack = res.get(explainer, name)
            if stack is None or np.ndim(stack) != 3 or cls not in res.classes:
                continue
            arr = np.asarray(stack[res.class_index(cls)], dtype=np.float32)
            arr = np.where(np.isfinite(arr), arr, 0.0)
            if not probability:
                top = float(arr.max()) if arr.size else 0.0
                if top <= 0:
                    continue
                arr = arr / top
            out[cls] = (name, np.clip(to_image_size(arr, shape, binary=False), 0.0, 1.0))
            break
    return out


def _model_name(res: Results, role: str) -> str | None:
    info = res.models.get(role) or {}
    return str(info.get("name") or info.get("bundle") or role) if info else None


class ProjectSegmentation:
    """The masks and maps of a project's studies (an ``inputs`` function for
    :func:`~cxrviewer.core.dicom_objects.exchange.export_dicom`; see the module docstring)."""

    def __init__(self, store: AnnotationStore, *, results: Sequence[str | os.PathLike] = (),
                 threshold: float = DEFAULT_THRESHOLD, run_model: bool = True,
                 bundle: str | os.PathLike | None = None, device: str = "cpu") -> None:
        if not np.isfinite(threshold) or not 0.0 < threshold <= 1.0:
            raise DicomObjectError(f"threshold {threshold!r} must lie in (0, 1]")
        self.store, self.threshold, self.run_model, self.device = store, float(threshold), run_model, device
        self.index = ResultsIndex(results)
        if bundle is None:
            from .bundle import default_models_dir

            bundle = default_models_dir() / SEGMENTATION_BUNDLE
        self.bundle = Path(bundle)
        self._pipeline = None

    def _load(self, rec: StudyRecord) -> Study:
        """The study's image, checked to be the annotated one."""
        if not rec.path:
            raise DicomObjectError(f"study {rec.id} has no known file; open the image in "
                                   "cxrviewer once so the project learns where it is")
        try:
            study = load_study(rec.path)
        except CxrError as exc:
            raise DicomObjectError(f"cannot load the image ({exc})", path=rec.path) from exc
        ident = rec.identity
        if (ident.sop_uid and str(study.meta.sop_uid or "") != ident.sop_uid) or (
                ident.sha256 and study.pixel_sha256() != ident.sha256):
            raise DicomObjectError("the file is no longer the annotated image", path=rec.path)
        return study

    def _segment(self, study: Study) -> Results:
        """The bundled segmentation model's results for ``study`` (segmentation role only)."""
        if self._pipeline is None:
            if not self.bundle.is_dir():
                raise DicomObjectError("no stored analysis of this image and no segmentation "
                                       "model to run", path=str(self.bundle))
            from .bundle import load_bundle
            from .pipeline import Pipeline

            self._pipeline = Pipeline({"segmentation": load_bundle(self.bundle)}, device=self.device)
        try:
            return self._pipeline.run(study)
        except CxrError as exc:
            raise DicomObjectError(f"the segmentation model failed ({exc})",
                                   path=study.meta.source_path) from exc

    def __call__(self, rec: StudyRecord) -> StudyInputs:
        """The study's :class:`StudyInputs` (masks from stored results, else from the model)."""
        study = self._load(rec)
        shape = study.shape
        found = self.index.find(rec.path, study.pixel_sha256())
        res, origin = (found[0], f"results {found[1]}") if found else (None, "")
        out = StudyInputs()
        if res is not None:
            maps = finding_maps(res, _classes_for(self.store, rec, res), shape)
            out.thresholded = [(c, m, self.threshold) for c, (_n, m) in maps.items()]
            out.fractional = {c: m for c, (_n, m) in maps.items()}
            out.map_algorithm = _model_name(res, "classifier")
        seg = res if res is not None and res.get("segmentation", "masks") is not None else None
        if seg is None and self.run_model:
            seg = self._segment(study)
            origin = ", ".join(filter(None, [origin, f"masks by {self.bundle.name}"]))
        if seg is not None and seg.get("segmentation", "masks") is not None:
            names = [str(n) for n in seg.attr("segmentation", "classes", [])]
            out.masks = segments_from_stack(np.asarray(seg.get("segmentation", "masks")), names, shape)
            out.algorithm = _model_name(seg, "segmentation") or self.bundle.name
        if not (out.masks or out.thresholded):
            raise DicomObjectError("no stored analysis with masks or maps of this image"
                                   + ("" if self.run_model else " (the model was not to be run)"),
                                   path=rec.path)
        out.origin = origin
        return out


def export_dicom_seg(store: AnnotationStore, target: str | os.PathLike, *,
                     results: Sequence[str | os.PathLike] = (),
                     threshold: float = DEFAULT_THRESHOLD, run_model: bool = True,
                     status: str | Sequence[str] | None = None,
                     bundle: str | os.PathLike | None = None) -> DicomExport:
    """Write every study's SEGs into the folder ``target`` (see the module docstring); raises
    :class:`~cxrviewer.core.dicom_objects.DicomObjectError` when no study could be written."""
    inputs = ProjectSegmentation(store, results=results, threshold=threshold,
                                 run_model=run_model, bundle=bundle)
    return export_dicom(store, target, kinds=EXPORT_KINDS["dicom-seg"], status=status,
                        inputs=inputs)


def _exporter(store: AnnotationStore, target: str | os.PathLike, *,
              include_identifiers: bool = False,
              status: str | Sequence[str] | None = None) -> Path:
    """Export format ``dicom-seg`` for the annotation ``EXPORTERS`` (:func:`export_dicom_seg`)."""
    return export_dicom_seg(store, target, status=status).folder


def register_format() -> None:
    """Put ``dicom-seg`` in the annotation ``EXPORTERS`` (idempotent; done on import too)."""
    EXPORTERS["dicom-seg"] = _exporter


register_format()
