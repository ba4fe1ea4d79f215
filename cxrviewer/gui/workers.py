"""Background jobs: QRunnables on a private QThreadPool, results back by signal.

The pattern (napari/superqt's): a :class:`_Job` (QRunnable) runs a plain
function in a pool thread and reports through a :class:`_JobSignals` QObject
that lives in the GUI thread, so deliveries are queued onto the GUI event loop.

* Every request gets a sequence number. Requests share a *channel* ("load",
  "worklist", "model"); a new request makes the older ones on its channel
  stale. Stale jobs that have not started are skipped, stale results dropped.
* The pool has ``maxThreadCount = 1`` by default: one job at a time, study
  decoding or torch (models and hooks are not thread-safe and torch is parallel inside).
* Only plain data crosses threads (numpy arrays, ``Study``, ``Worklist``):
  a job must never touch a widget.
* A function may be a generator: each yielded item is delivered as
  ``progress`` (panels fill progressively), its return value as ``finished``.
* :meth:`JobRunner.submit_with_context` passes a :class:`JobContext` first:
  ``ctx.report(item)`` delivers ``progress`` from inside a callback-style API
  (the pipeline's ``on_stage``) and ``ctx.cancelled()`` is the pipeline's
  ``cancel`` callable (true once the request is stale or the runner closed).
* :meth:`JobRunner.shutdown` (called on window close) makes everything stale,
  drops queued jobs and waits for the running one, so closing while a load
  runs exits cleanly.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, QRunnable, QThreadPool, Signal, Slot

from ..core.errors import CxrError

log = logging.getLogger(__name__)


class _JobSignals(QObject):
    """Signals of one job; created in (and delivered to) the GUI thread."""

    progress = Signal(int, object)
    finished = Signal(int, object)
    failed = Signal(int, str, object)


def _detached(err: BaseException) -> BaseException:
    """The exception without tracebacks: their frames hold this (auto-deleted) QRunnable,
    and a wrapper outliving its C++ object crashes the interpreter at exit."""
    e: BaseException | None = err
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return err


class JobContext:
    """Handed to a ``submit_with_context`` job: progress reports and a cancel check."""

    def __init__(self, job: "_Job") -> None:
        self._job = job
        self.channel = job.channel
        self.seq = job.seq

    def cancelled(self) -> bool:
        """True once a newer request on the channel exists or the runner shut down."""
        return not self._job._runner.is_current(self.channel, self.seq)

    def report(self, item: object) -> None:
        """Deliver ``item`` as ``progress`` (dropped when stale)."""
        if not self.cancelled():
            self._job.signals.progress.emit(self.seq, item)


class _Job(QRunnable):
    def __init__(self, runner: "JobRunner", channel: str, seq: int,
                 fn: Callable[..., Any], args: tuple, kwargs: dict, *, with_context: bool = False) -> None:
        super().__init__()
        self.with_context = with_context
        self.setAutoDelete(True)
        self._runner = runner
        self.channel = channel
        self.seq = seq
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.signals = _JobSignals()

    def run(self) -> None:  # pool thread
        if not self._runner.is_current(self.channel, self.seq):
            log.debug("skipping stale job %s#%d", self.channel, self.seq)
            self.signals.finished.emit(self.seq, None)  # dropped as stale, frees the slot
            return
        try:
            args = (JobContext(self), *self.args) if self.with_context else self.args
            result = self.fn(*args, **self.kwargs)
            if inspect.isgenerator(result):
                gen = result
                while True:
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if not self._runner.is_current(self.channel, self.seq):
                        gen.close()
                        result = None
                        break
                    self.signals.progress.emit(self.seq, item)
            self.signals.finished.emit(self.seq, result)
        except CxrError as err:
            self.signals.failed.emit(self.seq, str(err), _detached(err))
        except Exception as err:  # noqa: BLE001 - a job must never kill the app
            log.exception("background job %s#%d failed", self.channel, self.seq)
            self.signals.failed.emit(self.seq, f"{type(err).__name__}: {err}", _detached(err))


class JobRunner(QObject):
    """Runs functions off the GUI thread, one channel-latest result at a time.

    Signals (all in the GUI thread, stale results already dropped):
    ``progress(channel, seq, item)``, ``finished(channel, seq, result)``,
    ``failed(channel, seq, message, exception)``.
    """

    progress = Signal(str, int, object)
    finished = Signal(str, int, object)
    failed = Signal(str, int, str, object)

    def __init__(self, parent: QObject | None = None, *, max_threads: int = 1) -> None:
        super().__init__(parent)
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(max_threads)
        self._seq = itertools.count(1)
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, _JobSignals]] = {}
        self._closed = False

    # ---- bookkeeping (any thread) ---------------------------------------
    def is_current(self, channel: str, seq: int) -> bool:
        with self._lock:
            return not self._closed and self._latest.get(channel) == seq

    def latest(self, channel: str) -> int:
        with self._lock:
            return self._latest.get(channel, 0)

    @property
    def busy(self) -> bool:
        return self.pool.activeThreadCount() > 0

    # ---- API (GUI thread) -----------------------------------------------
    def submit(self, channel: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        """Queue ``fn(*args, **kwargs)``; returns the request's sequence number."""
        return self._submit(channel, fn, args, kwargs, False)

    def submit_with_context(self, channel: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        """Queue ``fn(ctx, *args, **kwargs)`` with a :class:`JobContext` ``ctx``."""
        return self._submit(channel, fn, args, kwargs, True)

    def _submit(self, channel: str, fn: Callable[..., Any], args: tuple, kwargs: dict,
                with_context: bool) -> int:
        if self._closed:
            return 0
        seq = next(self._seq)
        with self._lock:
            self._latest[channel] = seq
        job = _Job(self, channel, seq, fn, args, kwargs, with_context=with_context)
        # Bound slots of this GUI-thread QObject: Qt queues the calls (never lambdas,
        # which PySide may run in the emitting thread).
        job.signals.progress.connect(self._on_progress)
        job.signals.finished.connect(self._on_finished)
        job.signals.failed.connect(self._on_failed)
        self._pending[seq] = (channel, job.signals)  # keep the signals alive until delivery
        self.pool.start(job)
        return seq

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Wait for the queued and running jobs, then deliver their results (this thread's
        posted signals); True when the pool is idle. Unlike :meth:`shutdown`, it stays usable."""
        done = self.pool.waitForDone(timeout_ms)
        QCoreApplication.sendPostedEvents(self)
        return done

    def cancel(self, channel: str) -> None:
        """Make every request on ``channel`` stale (running ones finish unseen)."""
        with self._lock:
            self._latest[channel] = -1

    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Drop queued jobs and wait for the running one; True when the pool is idle."""
        with self._lock:
            self._closed = True
        self.pool.clear()
        done = self.pool.waitForDone(timeout_ms)
        self._pending.clear()
        if not done:
            log.warning("a background job was still running at shutdown")
        return done

    # ---- delivery (GUI thread) ------------------------------------------
    def _channel(self, seq: int) -> str:
        entry = self._pending.get(seq)
        return entry[0] if entry else ""

    def _forget(self, seq: int) -> str:
        entry = self._pending.pop(seq, None)
        return entry[0] if entry else ""

    @Slot(int, object)
    def _on_progress(self, seq: int, item: object) -> None:
        channel = self._channel(seq)
        if channel and self.is_current(channel, seq):
            self.progress.emit(channel, seq, item)

    @Slot(int, object)
    def _on_finished(self, seq: int, result: object) -> None:
        channel = self._forget(seq)
        if channel and self.is_current(channel, seq):
            self.finished.emit(channel, seq, result)
        else:
            log.debug("dropped stale result %s#%d", channel, seq)

    @Slot(int, str, object)
    def _on_failed(self, seq: int, message: str, exc: object) -> None:
        channel = self._forget(seq)
        if channel and self.is_current(channel, seq):
            self.failed.emit(channel, seq, message, exc)
        else:
            log.debug("dropped stale error %s#%d: %s", channel, seq, message)
