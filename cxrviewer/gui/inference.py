"""Progressive inference for the viewer: the pipeline off the GUI thread, plus caches.

Flow (napari's pattern: the model side is plain Python, Qt only carries results)::

    InferenceController.request(study, ref)
      -> memory LRU hit (pixel_sha256, model-set key)?        -> finished(results, display, "memory")
      -> else JobRunner "model" channel (the window's model runner: its own single thread,
         so decoding the next study never waits behind a model stage), in the worker thread:
           results cache file <cache dir>/<sha>-<key>.h5              -> "cache"
           an offline ``cxrviewer analyze`` results file for the study -> "file"
           else Pipeline.run(on_stage=..., cancel=ctx.cancelled)       -> "run"
             each stage -> progress(StageUpdate) with a snapshot of the Results so far and
             its DisplayData (numpy arrays and plain Python only)

The pipeline (torch) is only touched by the single worker thread: models are loaded there
too (:class:`PipelineHolder`); this module imports no torch. Switching study submits a new
request, which makes the running one stale: its ``cancel()`` turns true and the pipeline stops
after the current stage; anything it still reports is dropped by the runner (sequence numbers)
and by the pixel hash check here.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..core.catalog import BundleInfo, model_set_key
from ..core.display import DisplayData, build_display
from ..core.errors import CxrError
from ..core.panels import needs_class_maps
from ..core.result_cache import cache_path, read_matching, sidecar_candidates
from ..core.results import Results
from ..core.study import Study

log = logging.getLogger(__name__)

MEMORY_CACHE_SIZE = 6
#: stored map size for the GUI (maps are smooth; 256 keeps every slot cheap)
GUI_MAP_SIDE = 256


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


def results_cache_dir() -> Path:
    """``<cache dir>/results-cache``: ``$CXRVIEWER_CACHE_DIR``, else ``$CXRVIEWER_CONFIG_DIR/cache``
    (the tests' isolated folder), else Qt's per-user ``CacheLocation`` (e.g. ``~/.cache/cxrviewer``):
    a cache, never in the configuration folder."""
    env = os.environ.get("CXRVIEWER_CACHE_DIR")
    cfg = os.environ.get("CXRVIEWER_CONFIG_DIR")
    if env:
        base = Path(env)
    elif cfg:
        base = Path(cfg) / "cache"
    else:
        from PySide6.QtCore import QStandardPaths

        loc = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.CacheLocation)
        base = Path(loc) if loc else Path.home() / ".cache" / "cxrviewer"
    return base / "results-cache"


@dataclass
class Shown:
    """Results with the display data built for them in the worker thread."""

    results: Results
    display: DisplayData


@dataclass
class StageUpdate:
    """One pipeline stage done: a snapshot of the results so far (numpy + plain Python)."""

    sha: str
    stage: str
    results: Results
    elapsed: float  # seconds since the request was submitted
    display: DisplayData


def analyse_job(ctx: Any, holder: PipelineHolder, study: Study, sha: str, paths: Sequence[Path],
                key: str, device: Any, explicit: str | None, cache_folder: Path | None,
                t0: float) -> tuple[Shown | None, str]:
    """The "model" job: cached file, offline file or a pipeline run (worker thread)."""
    cpath = cache_path(sha, key, cache_folder or results_cache_dir())
    cands = [cpath] + ([Path(explicit)] if explicit else []) + sidecar_candidates(study.meta.source_path)
    for i, cand in enumerate(cands):
        res = read_matching(cand, sha)
        if res is not None:
            return Shown(res, build_display(res)), "cache" if i == 0 else f"file {cand}"
    if not paths:
        return None, "no models"
    if ctx.cancelled():
        return None, "cancelled"
    pipeline = holder.get(paths, key, device)
    shown = [DisplayData()]

    def on_stage(name: str, r: Results) -> None:
        snap = r.snapshot()
        shown[0] = build_display(snap, shown[0])
        ctx.report(StageUpdate(sha, name, snap, time.perf_counter() - t0, shown[0]))

    res = pipeline.run(study, on_stage=on_stage, cancel=ctx.cancelled)
    try:
        from ..core.io.results import write_results

        write_results(res, cpath)
    except CxrError as exc:
        log.warning("results not cached: %s", exc)
    return Shown(res, build_display(res, shown[0])), "run"


def mine_class_job(holder: PipelineHolder, results: Results, class_index: int) -> tuple[str, str, dict]:
    """On-demand maps (attention-mining steps) of one more class (worker thread)."""
    maps = holder.pipeline.class_maps(results, class_index)
    return results.pixel_sha256, results.classes[class_index], maps


class InferenceController(QObject):
    """Runs (or finds) the results of the current study; see the module docstring.

    Signals: ``started(sha)``, ``stageReady(StageUpdate)``, ``unavailable(sha, why)``,
    ``finished(sha, results, source)`` (its display data: :meth:`display_for`),
    ``failed(sha, message)``, ``classMined(sha, class_name, maps)``.
    """

    started = Signal(str)
    unavailable = Signal(str, str)  # sha, why (no models and no results file)
    stageReady = Signal(object)
    finished = Signal(str, object, str)
    failed = Signal(str, str)
    classMined = Signal(str, str, object)

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
        self.memory: OrderedDict[tuple[str, str], Shown] = OrderedDict()
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
    def cached(self, sha: str) -> Results | None:
        hit = self.memory.get((sha, self.key))
        return hit.results if hit is not None else None

    def display_for(self, sha: str) -> DisplayData:
        """The display data of the results of ``sha`` held in memory (empty when none)."""
        hit = self.memory.get((sha, self.key))
        return hit.display if hit is not None else DisplayData()

    def remember(self, shown: Shown) -> None:
        k = (shown.results.pixel_sha256, self.key)
        self.memory[k] = shown
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
            self.finished.emit(sha, hit, "memory")  # display_for(sha) holds its display data
            return "memory"
        self._seq = self.runner.submit_with_context(
            self.CHANNEL, analyse_job, self.holder, study, sha, self.paths, self.key, self.device,
            results_file, self.cache_folder, self.t_request)
        return "queued"

    def mine_class(self, results: Results, class_index: int) -> bool:
        """Compute on-demand maps (attention-mining steps) for another class (False: not possible here)."""
        name = results.classes[class_index]
        if not needs_class_maps(results, name) or results.pixel_sha256 != self.current_sha:
            return False
        if self.holder.pipeline is None or not results.state:
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
        elif channel == self.CHANNEL and isinstance(result, tuple) and isinstance(result[0], Shown):
            shown, source = result
            sha = shown.results.pixel_sha256
            if sha != self.current_sha:
                return
            self.remember(shown)
            self.finished.emit(sha, shown.results, source)
        elif channel == self.AM_CHANNEL and isinstance(result, tuple):
            sha, name, maps = result
            self._pending_mine.discard((sha, name))
            hit = self.memory.get((sha, self.key))
            if hit is not None:
                hit.results.add_class_maps(name, maps)
            if sha == self.current_sha:
                self.classMined.emit(sha, name, maps)

    def _on_failed(self, channel: str, seq: int, message: str, exc: object) -> None:
        if channel == self.CHANNEL:
            self.failed.emit(self.current_sha, message)
        elif channel == self.AM_CHANNEL:
            self._pending_mine.clear()
            self.failed.emit(self.current_sha, message)
