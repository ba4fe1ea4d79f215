"""Progressive inference for the viewer: the pipeline off the GUI thread, plus caches.

Flow (napari's pattern: the model side is plain Python, Qt only carries results)::

    InferenceController.request(study, ref)
      -> memory LRU hit (pixel_sha256, model-set key)?        -> finished(results, "memory")
      -> else JobRunner "model" channel (the window's model runner: its own single thread,
         so decoding the next study never waits behind a model stage), in the worker thread:
           results cache file <config>/results-cache/<sha>-<key>.h5   -> "cache"
           an offline ``cxrviewer analyze`` results file for the study -> "file"
           else Pipeline.run(on_stage=..., cancel=ctx.cancelled)       -> "run"
             each stage -> progress(StageUpdate) with a snapshot of the Results so far
             (numpy arrays and plain Python only; the GUI never sees the live object)

The pipeline (torch) is only touched by the single worker thread: models are
loaded there too (:class:`PipelineHolder`). Switching study submits a new
request, which makes the running one stale: its ``cancel()`` turns true and
the pipeline stops after the current stage; anything it still reports is
dropped by the runner (sequence numbers) and by the pixel hash check here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..core.errors import CxrError
from ..core.study import Study

log = logging.getLogger(__name__)

MEMORY_CACHE_SIZE = 6
#: stored map size for the GUI (maps are smooth; 256 keeps every slot cheap)
GUI_MAP_SIDE = 256
RESULTS_SUFFIXES = (".h5", ".hdf5")


# ---------------------------------------------------------------------------
# Model sets
@dataclass
class BundleInfo:
    """What the model picker shows of one bundle (read from its manifest only)."""

    path: Path
    name: str
    family: str
    architecture: str
    role: str | None
    research_demo: bool
    trained: bool
    weights_sha256: str | None
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    research_use_only: bool = False

    @property
    def badge(self) -> str:
        """'untrained', 'research demo', 'research use only' or '' (what the GUI says plainly)."""
        if not self.trained:
            return "untrained"
        if self.research_demo:
            return "research demo"
        if self.research_use_only:
            return "research use only"
        return ""


def scan_bundles(folder: str | os.PathLike) -> list[BundleInfo]:
    """Manifests of the ``*.cxrbundle`` folders in ``folder`` (unreadable ones flagged)."""
    from ..core.bundle import find_bundles, read_manifest

    out: list[BundleInfo] = []
    try:
        paths = find_bundles(folder)
    except (CxrError, OSError) as exc:
        log.warning("cannot scan %s for models: %s", folder, exc)
        return out
    for p in paths:
        try:
            m = read_manifest(p)
        except CxrError as exc:
            out.append(BundleInfo(Path(p), Path(p).name, "?", "?", None, True, False, None, error=str(exc)))
            continue
        prov = m.provenance
        out.append(BundleInfo(Path(p), m.name or Path(p).stem, m.family, m.architecture, m.role,
                              m.research_demo, bool(prov.get("trained", True)), m.weights_sha256,
                              m.description, dict(prov.get("metrics") or {}),
                              research_use_only=bool(prov.get("research_use_only", False))))
    return out


def model_set_key(bundles: Sequence[BundleInfo]) -> str:
    """A short stable key for a set of bundles (names + weight checksums)."""
    items = sorted((b.name, b.architecture, b.weights_sha256 or str(b.path)) for b in bundles if not b.error)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class PipelineHolder:
    """Loads and keeps the pipeline for one model set; used from the worker thread only."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.pipeline: Any = None

    def get(self, paths: Sequence[Path], key: str, device: Any) -> Any:
        if self.pipeline is None or self.key != key:
            from ..core.bundle import load_bundle
            from ..core.pipeline import Pipeline, assign_roles

            self.pipeline = None
            loaded = [load_bundle(p) for p in paths]
            self.pipeline = Pipeline(assign_roles(loaded), device, map_max_side=GUI_MAP_SIDE)
            self.key = key
        return self.pipeline


# ---------------------------------------------------------------------------
# Results files
def results_cache_dir() -> Path:
    """``<config dir>/results-cache`` (``$CXRVIEWER_CONFIG_DIR`` in tests)."""
    cfg = os.environ.get("CXRVIEWER_CONFIG_DIR")
    if cfg:
        base = Path(cfg)
    else:
        from PySide6.QtCore import QStandardPaths

        base = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppConfigLocation)
                    or Path.home() / ".config" / "cxrviewer")
    return base / "results-cache"


def cache_path(sha: str, key: str, folder: Path | None = None) -> Path:
    return (folder or results_cache_dir()) / f"{sha[:32]}-{key}.h5"


def sidecar_candidates(study_path: str | os.PathLike) -> list[Path]:
    """Where an offline results file for a study may sit beside it."""
    p = Path(study_path)
    return [p.with_name(p.name + ".results.h5"), p.with_name(p.stem + ".results.h5"),
            p.parent / p.stem / "results.h5", p.parent / "results.h5"]


def read_matching(path: Path, sha: str) -> Any | None:
    """Results from ``path`` when it exists and belongs to the pixels ``sha``; else None."""
    if not path.is_file():
        return None
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if str(f.attrs.get("pixel_sha256", "")) != sha:
                return None
        from ..core.io.results import read_results

        return read_results(path)
    except (CxrError, OSError, KeyError, ValueError) as exc:
        log.warning("ignoring results file %s: %s", path, exc)
        return None


def results_file_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Study path, id, classes and probabilities of a results file (no maps read)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        a = f.attrs
        probs = f["probabilities"][()] if "probabilities" in f else None
        return {"source_path": str(a.get("source_path", "")), "study_id": str(a.get("study_id", "")),
                "pixel_sha256": str(a.get("pixel_sha256", "")),
                "classes": list(json.loads(a.get("classes", "[]"))),
                "probabilities": None if probs is None else np.asarray(probs, np.float32)}


def _has_images(folder: Path) -> bool:
    exts = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
    return (folder / "images").is_dir() or any(f.suffix.lower() in exts for f in folder.iterdir() if f.is_file())


def expand_paths(paths: Sequence[str | os.PathLike]):
    """``open_worklist`` plus HDF5 results files (``cxrviewer analyze`` output).

    A results file (or a folder holding ``*/results.h5``) becomes a worklist row for
    its source image with ``extra["results"]`` pointing at the file.
    """
    import numpy as np

    from ..core import io as cio
    from ..core.io.worklist import StudyRef, Worklist

    plain: list[str] = []
    h5s: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() in RESULTS_SUFFIXES:
            h5s.append(p)
        elif p.is_dir() and not _has_images(p) and list(p.glob("*/results.h5")):
            h5s.extend(sorted(p.glob("*/results.h5")))  # a `cxrviewer analyze --out` folder
        else:
            plain.append(str(raw))
    wl = cio.open_worklist(plain) if plain else Worklist(source=", ".join(map(str, paths)))
    for h5 in h5s:
        try:
            info = results_file_summary(h5)
        except (OSError, KeyError, ValueError) as exc:
            wl.errors.append(f"{h5}: not a readable results file ({exc})")
            continue
        src = Path(info["source_path"])
        if not src.is_file():
            wl.errors.append(f"{h5}: its study {src} is not found")
            continue
        extra = {"results": str(h5)}
        probs = info["probabilities"]
        if probs is not None and len(info["classes"]) == len(probs):
            top = np.argsort(-probs, kind="stable")[:3]
            extra["findings"] = json.dumps([[info["classes"][i], float(probs[i])] for i in top])
        wl.refs.append(StudyRef(path=src, key=f"{os.path.abspath(src)}", display_name=src.name, extra=extra))
    if h5s and not wl.source:
        wl.source = ", ".join(map(str, paths))
    return wl


def display_pyramid(image: Any, levels: int = 3, min_side: int = 64) -> list:
    """``[image, /2, /4, ...]`` 2x2-mean levels (the ImagePanel display pyramid), float32."""
    import numpy as np

    out = [image]
    a = image
    for _ in range(levels):
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        if min(h, w) // 2 < min_side:
            break
        a = a[:h, :w].astype(np.float32, copy=False).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        out.append(a)
    return out


def load_for_display(ref: Any, timeout: float = 30.0) -> Study:
    """The "load" job: decode a study and pre-compute its display pyramid off the GUI thread
    (shared by every panel, see ``ImagePanel.set_image(pyramid=...)``)."""
    study = ref.load(timeout=timeout)
    try:
        study.display_pyramid = display_pyramid(study.modality)
    except (ValueError, MemoryError) as exc:  # a display nicety: never fail the load for it
        log.debug("no display pyramid: %s", exc)
    return study


# ---------------------------------------------------------------------------
@dataclass
class StageUpdate:
    """One pipeline stage done: a snapshot of the results so far (numpy + plain Python)."""

    sha: str
    stage: str
    results: Any
    elapsed: float  # seconds since the request was submitted


def snapshot(res: Any) -> Any:
    """A shallow copy of ``Results`` the GUI may keep (dicts copied, torch state dropped)."""
    snap = copy.copy(res)
    snap.am_steps = dict(res.am_steps)
    snap.am_erased = dict(res.am_erased)
    snap.boxes = {k: list(v) for k, v in res.boxes.items()}
    snap.timings = dict(res.timings)
    snap.models = dict(res.models)
    snap.notices = list(res.notices)
    snap._am_state = None
    return snap


def analyse_job(ctx: Any, holder: PipelineHolder, study: Study, sha: str, paths: Sequence[Path],
                key: str, device: Any, explicit: str | None, cache_folder: Path | None,
                t0: float) -> tuple[Any, str]:
    """The "model" job: cached file, offline file or a pipeline run (worker thread)."""
    cpath = cache_path(sha, key, cache_folder)
    res = read_matching(cpath, sha)
    if res is not None:
        return _with_pyramids(res), "cache"
    cands = ([Path(explicit)] if explicit else []) + sidecar_candidates(study.meta.source_path)
    for cand in cands:
        res = read_matching(cand, sha)
        if res is not None:
            return _with_pyramids(res), f"file {cand}"
    if not paths:
        return None, "no models"
    if ctx.cancelled():
        return None, "cancelled"
    pipeline = holder.get(paths, key, device)

    def on_stage(name: str, r: Any) -> None:
        _with_pyramids(r)
        ctx.report(StageUpdate(sha, name, snapshot(r), time.perf_counter() - t0))

    res = pipeline.run(study, on_stage=on_stage, cancel=ctx.cancelled)
    try:
        from ..core.io.results import write_results

        write_results(res, cpath)
    except CxrError as exc:
        log.warning("results not cached: %s", exc)
    return res, "run"


def warped_frame_mask(affine: Any, map_shape: tuple[int, int]) -> Any:
    """Where maps computed on the aligned image land on the original (bool ``map_shape``).

    The pipeline draws aligned-frame maps back through the inverse warp and fills the
    outside with each map's minimum; the GUI leaves that outside transparent.
    """
    import numpy as np
    import torch

    from ..core.models.alignment import invert_affine, warp

    theta = torch.as_tensor(np.asarray(affine, np.float64)[None])
    inv = invert_affine(theta).float()
    ones = torch.ones(1, 1, *map_shape)
    with torch.no_grad():
        return (warp(ones, inv)[0, 0] > 0.5).numpy()


def _with_pyramids(res: Any) -> Any:
    """Attach display data built here, in the worker thread: the aligned image's pyramid and
    the lung/heart RGBA overlay (so the GUI thread only hands arrays to Qt)."""
    from .views.explain_panels import segmentation_rgba

    img = getattr(res, "aligned_image", None)
    pyr = getattr(res, "aligned_pyramid", None)
    if img is not None and not (pyr and pyr[0] is img):
        res.aligned_pyramid = display_pyramid(img)
    aff = getattr(res, "affine", None)
    if aff is not None and getattr(res, "map_valid", None) is None:
        res.map_valid = warped_frame_mask(aff, tuple(res.map_shape))
    nrm = getattr(res, "paired_normal", None)
    npyr = getattr(res, "paired_pyramid", None)
    if nrm is not None and not (npyr and npyr[0] is nrm):
        res.paired_pyramid = display_pyramid(nrm)
    seg = getattr(res, "segmentation", None)
    over = getattr(res, "segmentation_overlay", None)
    if seg is not None and not (over is not None and over[0] is seg):
        res.segmentation_overlay = (seg, segmentation_rgba(seg))
    return res


def mine_class_job(holder: PipelineHolder, results: Any, class_index: int) -> tuple[str, Any, Any, Any]:
    """Attention-mining steps of one more class, on a copy (worker thread)."""
    tmp = copy.copy(results)
    tmp.am_steps, tmp.am_erased = {}, {}
    holder.pipeline.compute_class(tmp, class_index)
    name = results.classes[class_index]
    return results.pixel_sha256, name, tmp.am_steps[name], tmp.am_erased[name]


class InferenceController(QObject):
    """Runs (or finds) the results of the current study; see the module docstring.

    Signals: ``started(sha)``, ``stageReady(StageUpdate)``, ``unavailable(sha, why)``,
    ``finished(sha, results, source)``, ``failed(sha, message)``,
    ``classMined(sha, class_name, steps, erased)``.
    """

    started = Signal(str)
    unavailable = Signal(str, str)  # sha, why (no models and no results file)
    stageReady = Signal(object)
    finished = Signal(str, object, str)
    failed = Signal(str, str)
    classMined = Signal(str, str, object, object)

    CHANNEL = "model"
    AM_CHANNEL = "am"

    def __init__(self, runner: Any, parent: QObject | None = None, *, device: Any = None,
                 cache_folder: Path | None = None, memory_size: int = MEMORY_CACHE_SIZE) -> None:
        super().__init__(parent)
        self.runner = runner
        self.holder = PipelineHolder()
        self.device = device
        self.cache_folder = cache_folder
        self.memory_size = memory_size
        self.memory: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.bundles: list[BundleInfo] = []
        self.key = ""
        self.current_sha = ""
        self._seq = 0
        self._am_seq = 0
        self._pending_mine: set[tuple[str, str]] = set()
        self.t_request = 0.0
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)

    # ---- models -------------------------------------------------------------
    def set_bundles(self, bundles: Sequence[BundleInfo]) -> None:
        """Use these bundles from now on (the next request loads them)."""
        self.bundles = [b for b in bundles if not b.error]
        self.key = model_set_key(self.bundles)

    @property
    def paths(self) -> list[Path]:
        return [b.path for b in self.bundles]

    # ---- requests -----------------------------------------------------------
    def cached(self, sha: str) -> Any | None:
        return self.memory.get((sha, self.key))

    def remember(self, results: Any) -> None:
        k = (results.pixel_sha256, self.key)
        self.memory[k] = results
        self.memory.move_to_end(k)
        while len(self.memory) > self.memory_size:
            self.memory.popitem(last=False)

    def cancel(self) -> None:
        """Make the running/queued analysis stale (switching study, closing)."""
        self.current_sha = ""
        self.runner.cancel(self.CHANNEL)
        self.runner.cancel(self.AM_CHANNEL)

    def request(self, study: Study, *, results_file: str | None = None) -> str:
        """Show results for ``study``: at once from memory, else via the worker."""
        sha = study.pixel_sha256()
        self.current_sha = sha
        self.t_request = time.perf_counter()
        self.started.emit(sha)
        hit = self.cached(sha)
        if hit is not None:
            self.runner.cancel(self.CHANNEL)
            self.memory.move_to_end((sha, self.key))
            self.finished.emit(sha, hit, "memory")
            return "memory"
        self._seq = self.runner.submit_with_context(
            self.CHANNEL, analyse_job, self.holder, study, sha, self.paths, self.key, self.device,
            results_file, self.cache_folder, self.t_request)
        return "queued"

    def mine_class(self, results: Any, class_index: int) -> bool:
        """Compute attention-mining steps for another class (False: not possible here)."""
        name = results.classes[class_index]
        if name in results.am_steps or results.pixel_sha256 != self.current_sha:
            return False
        pipe = self.holder.pipeline
        if pipe is None or getattr(results, "_am_state", None) is None:
            return False
        if (results.pixel_sha256, name) in self._pending_mine:
            return True
        self._pending_mine.add((results.pixel_sha256, name))
        self._am_seq = self.runner.submit(self.AM_CHANNEL, mine_class_job, self.holder, results, class_index)
        return True

    # ---- deliveries (GUI thread) ---------------------------------------------
    def _on_progress(self, channel: str, seq: int, item: object) -> None:
        if channel == self.CHANNEL and isinstance(item, StageUpdate) and item.sha == self.current_sha:
            self.stageReady.emit(item)

    def _on_finished(self, channel: str, seq: int, result: object) -> None:
        if channel == self.CHANNEL and isinstance(result, tuple) and result[0] is None:
            self.unavailable.emit(self.current_sha, str(result[1]))
        elif channel == self.CHANNEL and isinstance(result, tuple) and result[0] is not None:
            res, source = result
            if res.pixel_sha256 != self.current_sha:
                return
            self.remember(res)
            self.finished.emit(res.pixel_sha256, res, source)
        elif channel == self.AM_CHANNEL and isinstance(result, tuple):
            sha, name, steps, erased = result
            self._pending_mine.discard((sha, name))
            res = self.memory.get((sha, self.key))
            if res is not None:
                res.am_steps[name] = steps
                res.am_erased[name] = erased
            if sha == self.current_sha:
                self.classMined.emit(sha, name, steps, erased)

    def _on_failed(self, channel: str, seq: int, message: str, exc: object) -> None:
        if channel == self.CHANNEL:
            self.failed.emit(self.current_sha, message)
        elif channel == self.AM_CHANNEL:
            self._pending_mine.clear()
            self.failed.emit(self.current_sha, message)
