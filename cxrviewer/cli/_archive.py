"""Archive-scale pieces of ``cxrviewer analyze``: inputs, progress, resume, the combined table,
torchrun shards and the decoding pool.

* :func:`iter_inputs` expands files, folders (recursive), NIH folders and list files one path at
  a time, without decoding or opening a study; :func:`collect_inputs` keeps only the paths (an
  NIH folder's label rows as :class:`~cxrviewer.core.io.StudyRef`), de-duplicated, in input order.
* :class:`Progress`: ``N/M`` with a rate and ETA on stderr, one line updated in place on a
  terminal, a plain line every few seconds otherwise.
* :func:`is_done`: whether ``OUT/<name>/summary.json`` holds the analysis of the same file (path,
  size, modification time) by the same models (weights SHA-256) with the same options.
* :func:`place_study`: a study's files are written into ``OUT/.partial/<name>+XXXX`` and renamed
  into ``OUT/<name>`` only when all are written, so a kill never leaves a half-written study.
* :func:`write_table`: ``OUT/predictions.csv`` rebuilt from the per-study summaries.
* :class:`Shard`: ``RANK``/``WORLD_SIZE`` from torchrun; disjoint shards by index modulo the world
  size; a ``torch.distributed`` barrier (gloo on the CPU, nccl on GPUs).
* :class:`Prefetcher`: studies decoded ahead by worker processes.
* :class:`BackgroundWriter`: study folders (results.h5, panels.png, summary.json) written by one
  thread while the next study is computed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from cxrviewer.core.errors import CxrError
from cxrviewer.core.io import StudyRef

#: where unfinished study folders are written before they are renamed into place
PARTIAL = ".partial"
#: the combined table beside the per-study folders
TABLE = "predictions.csv"
TABLE_COLUMNS = ("study", "source_path", "class", "probability", "box_method", "box_x", "box_y", "box_w",
                 "box_h", "box_score")
#: files a study folder of ours may hold (a folder holding only these and no summary.json is
#: the remains of an interrupted write and is redone)
OUR_FILES = frozenset({"results.h5", "panels.png", "summary.json"})


class ArchiveError(CxrError):
    """An input list or a multi-process run cannot be used."""


# ---- inputs ----------------------------------------------------------------------------------
def _walk(root: Path) -> Iterator[str]:
    """Study files under ``root`` in sorted order (hidden files and folders skipped)."""
    from cxrviewer.core.io import _is_study_file

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if not name.startswith(".") and _is_study_file(full, name):
                yield os.path.abspath(full)


def _list_lines(path: Path) -> Iterator[str]:
    """Paths named by a list file, one a line (blank lines and ``#`` comments skipped; a relative
    path is taken from the list file's folder)."""
    base = path.parent
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield os.path.abspath(base / line)
    except OSError as exc:
        raise ArchiveError(f"cannot read the list ({exc.strerror or exc})", path=str(path)) from None


def iter_inputs(paths: Iterable[str], lists: Iterable[str] = ()) -> Iterator[Any]:
    """Yield one item per study: an absolute path (str), a :class:`StudyRef` (NIH folder rows) or
    an error message (str starting with ``"!"``) for a path that cannot be used. Nothing is decoded;
    a file named in a list is not even looked at here (a missing one fails when it is loaded)."""
    from cxrviewer.core.io import is_nih_folder, read_nih_folder

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            yield f"!{raw}: no such file or folder"
        elif p.is_dir() and is_nih_folder(p):
            try:
                wl = read_nih_folder(p)
            except CxrError as exc:
                yield f"!{exc}"
                continue
            yield from (f"!{e}" for e in wl.errors)
            yield from wl.refs
        elif p.is_dir():
            n = 0
            for n, full in enumerate(_walk(p), 1):
                yield full
            if not n:
                yield f"!{raw}: no DICOM, PNG, JPEG or TIFF files found"
        else:
            yield os.path.abspath(p)
    for lst in lists:
        yield from _list_lines(Path(lst))


def entry_path(entry: Any) -> str:
    """The absolute path of an input entry."""
    return os.path.abspath(entry.path) if isinstance(entry, StudyRef) else entry


def display_name(entry: Any) -> str:
    """How an entry is named in messages: an NIH row's name, else the file's name."""
    return entry.display_name if isinstance(entry, StudyRef) else os.path.basename(entry)


def collect_inputs(paths: Iterable[str], lists: Iterable[str] = ()) -> tuple[list[Any], list[str]]:
    """``(entries, errors)``: every study once (first occurrence wins), in input order."""
    entries: list[Any] = []
    errors: list[str] = []
    seen: set[str] = set()
    for item in iter_inputs(paths, lists):
        if isinstance(item, str) and item.startswith("!"):
            errors.append(item[1:])
            continue
        key = entry_path(item)
        if key not in seen:
            seen.add(key)
            entries.append(item)
    return entries, errors


# ---- progress --------------------------------------------------------------------------------
def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Progress:
    """``N/M`` studies with the rate of analysed studies and an ETA, written to ``stream``."""

    total: int
    stream: TextIO | None = None
    every: float = 10.0  # seconds between plain lines (not a terminal); 0: a line per study
    prefix: str = ""
    analysed: int = 0
    skipped: int = 0
    failed: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _last: float = float("-inf")
    _shown: int = -1  # the count last shown (-1: none yet)

    def __post_init__(self) -> None:
        self._last = self._t0 if self.every > 0 else float("-inf")  # a log's first line after `every` s

    @property
    def done(self) -> int:
        return self.analysed + self.skipped + self.failed

    def line(self) -> str:
        """The current progress line."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.analysed / dt
        eta = (self.total - self.done) / rate if rate > 0 else (0.0 if self.done >= self.total else math.inf)
        return (f"{self.prefix}{self.done}/{self.total} studies ({self.analysed} analysed, {self.skipped} already "
                f"done, {self.failed} failed), {rate:.2f} studies/s, elapsed {_duration(dt)}, ETA {_duration(eta)}")

    def _tty(self) -> bool:
        return bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())

    def update(self, *, analysed: int = 0, skipped: int = 0, failed: int = 0) -> None:
        """Count studies and show the line when it is due."""
        self.analysed += analysed
        self.skipped += skipped
        self.failed += failed
        if self.stream is None or not (analysed or skipped or failed):
            return
        tty = self._tty()
        if (tty and self._shown < 0) or time.perf_counter() - self._last >= (0.25 if tty else self.every):
            self._show(tty)

    def _show(self, tty: bool) -> None:
        text = self.line()
        self.stream.write(f"\r{text}\x1b[K" if tty else text + "\n")
        self.stream.flush()
        self._last = time.perf_counter()
        self._shown = self.done

    def clear(self) -> None:
        """Wipe the in-place line on a terminal before another message is written."""
        if self._tty() and self._shown >= 0:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = -1  # shown again by the next update or close

    def close(self) -> None:
        """The final line (in a log only when a line was written before: short runs stay quiet)."""
        if self.stream is None:
            return
        tty = self._tty()
        if (tty or self._shown >= 0) and self._shown != self.done:
            self._show(tty)
        if tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- resume ----------------------------------------------------------------------------------
def source_identity(path: str) -> dict[str, int] | None:
    """``{"bytes", "mtime_ns"}`` of a file (None: it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The JSON object in ``folder/summary.json`` (None: missing or not an object)."""
    try:
        d = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def weights_of(models: Any) -> dict[str, Any]:
    """``{role: weights_sha256}`` of a summary's (or results') ``models`` record."""
    if not isinstance(models, dict):
        return {}
    return {str(r): (m.get("weights_sha256") if isinstance(m, dict) else None) for r, m in models.items()}


def is_done(folder: Path, source: str, analysis: dict[str, Any]) -> bool:
    """True when ``folder`` holds a complete analysis of the file ``source`` as it is now, made
    with the same models (weights SHA-256 per role) and options (``analysis``)."""
    s = read_summary(folder)
    if s is None or s.get("source_path") != os.path.abspath(source):
        return False
    ident = source_identity(source)
    if ident is None or s.get("source_file") != ident or s.get("analysis") != analysis:
        return False
    if weights_of(s.get("models")) != analysis.get("weights_sha256"):
        return False
    files = s.get("files")
    return isinstance(files, dict) and all(isinstance(f, str) and (folder / f).is_file() for f in files.values())


def is_interrupted_write(folder: Path) -> bool:
    """True for a folder holding only files of ours (or none) and no ``summary.json``: the remains
    of an analysis killed while writing (older versions wrote in place)."""
    try:
        names = [e.name for e in os.scandir(folder)]
    except OSError:
        return False
    if "summary.json" in names:
        return False
    return all(n in OUR_FILES or (n.startswith(".") and n.endswith(".tmp")) for n in names)


# ---- atomic study folders --------------------------------------------------------------------
def new_partial(out: Path, name: str) -> Path:
    """A fresh folder ``OUT/.partial/<name>+XXXX`` (earlier leftovers of ``name`` removed)."""
    part = out / PARTIAL
    part.mkdir(parents=True, exist_ok=True)
    for e in os.scandir(part):
        if e.name.partition("+")[0] == name:  # '+' never occurs in a study name
            shutil.rmtree(e.path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}+", dir=part))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def place_study(tmp: Path, target: Path, tries: int = 3) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an earlier analysis there (and
    one another run placed there meanwhile: the last writer wins)."""
    for attempt in range(tries):
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{target.name}+old", dir=tmp.parent))
            try:
                os.rename(target, old / "x")
            except FileNotFoundError:  # moved away by another run meanwhile
                pass
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if attempt == tries - 1 or not target.exists():
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def clean_partial(out: Path) -> None:
    """Remove ``OUT/.partial`` (every rank has finished)."""
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


# ---- the combined table ----------------------------------------------------------------------
def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


def _default_box(summary: dict[str, Any], cls: str) -> dict[str, Any] | None:
    """The default method's box of ``cls`` with the highest score (the first when none has one)."""
    boxes = (summary.get("boxes") or {}).get(summary.get("default_box_method") or "", [])
    mine = [b for b in boxes if isinstance(b, dict) and b.get("label") == cls]
    if not mine:
        return None
    scored = [b for b in mine if isinstance(b.get("score"), (int, float))]
    return max(scored, key=lambda b: b["score"]) if scored else mine[0]


def table_rows(name: str, summary: dict[str, Any]) -> Iterator[list[str]]:
    """One row per class of one study's summary."""
    probs = summary.get("probabilities") or {}
    method = summary.get("default_box_method") or ""
    for cls in summary.get("classes") or []:
        b = _default_box(summary, cls)
        box = [_num(b.get(k), 2) for k in ("x", "y", "w", "h")] + [_num(b.get("score"), 6)] if b else [""] * 5
        yield [name, summary.get("source_path") or "", cls, _num(probs.get(cls), 6), method if b else "", *box]


def write_table(out: Path, items: Iterable[tuple[str, str]], analysis: dict[str, Any]) -> int:
    """Write ``OUT/predictions.csv`` atomically from the summaries of ``items`` (name, source) that
    are done (:func:`is_done`), in order; returns the number of studies in it."""
    from cxrviewer.core.atomic import mkstemp_beside

    target = out / TABLE
    fd, tmp = mkstemp_beside(target, ".csv.tmp")
    n = 0
    try:
        with io.open(fd, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(TABLE_COLUMNS)
            for name, source in items:
                d = out / name
                if is_done(d, source, analysis):
                    w.writerows(table_rows(name, read_summary(d) or {}))
                    n += 1
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


# ---- torchrun shards ---------------------------------------------------------------------------
@dataclass
class Shard:
    """This process's share of the inputs: index ``i`` is ours when ``i % world == rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # the torch.distributed backend, when one was started

    @classmethod
    def from_env(cls, device: str = "auto") -> "Shard":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them) and, for a world
        of more than one, join the process group (nccl when running on CUDA with a GPU per process,
        else gloo) and pick this process's GPU (``LOCAL_RANK`` modulo the GPUs)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ArchiveError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise ArchiveError(f"RANK {rank} is outside WORLD_SIZE {world}")
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ArchiveError("WORLD_SIZE is set without MASTER_ADDR/MASTER_PORT: start the run with torchrun")
        import torch
        import torch.distributed as dist

        backend = "gloo"
        if device != "cpu" and torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            torch.cuda.set_device(local % gpus)
            # nccl needs a GPU per process on a node; more processes than GPUs share them over gloo
            backend = "nccl" if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= gpus else "gloo"
        dist.init_process_group(backend, timeout=timedelta(days=7))  # ranks wait for the slowest shard
        watch_parent(os.getppid())  # torchrun killed (SIGKILL reaches only it): its ranks stop too
        return cls(rank, world, local, backend)

    def mine(self, n: int) -> list[int]:
        """The input indices this process analyses."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.backend is not None:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.backend is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.backend = None

    @property
    def tag(self) -> str:
        """``"[rank R/W] "`` in a multi-process run, else empty."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


# ---- decoding workers --------------------------------------------------------------------------
def load_entry(entry: Any) -> tuple[str, Any]:
    """``("ok", Study)`` or ``("error", one-line message)``: runs in a worker process."""
    from cxrviewer.core.io import load_study

    try:
        study = entry.load() if isinstance(entry, StudyRef) else load_study(entry)
    except CxrError as exc:
        path = entry_path(entry)
        return "error", (str(exc) if path in str(exc) else f"{path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a worker reports, never dies
        return "error", f"{entry_path(entry)}: could not be loaded ({type(exc).__name__}: {exc})"
    return "ok", study


def watch_parent(parent: int, every: float = 1.0) -> None:
    """In a worker: exit when the process that started it is gone (a killed run leaves no workers)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class Prefetcher:
    """Loads ``entries`` in order with ``workers`` processes, up to ``2 * workers`` ahead
    (``workers=0``: in this process, when asked).

    A worker that dies (a decoder crash, the OS's out-of-memory killer) breaks the whole pool and
    every load queued in it: the pool is restarted, the entry is retried alone (so a study that
    kills its worker twice is reported as an error, and only it), and the queued ones are sent
    again. ``loader`` (a module-level function, for the worker processes) is :func:`load_entry`."""

    def __init__(self, entries: list[Any], workers: int,
                 loader: Callable[[Any], tuple[str, Any]] = load_entry) -> None:
        self.entries = entries
        self.loader = loader
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[Future[tuple[str, Any]]] = deque()
        self.next = 0
        self.restarts = 0
        if workers > 0 and entries:
            self.ahead = 2 * workers
            self.pool = self._start()
            self._fill()

    def _start(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=watch_parent, initargs=(os.getpid(),))

    def _fill(self) -> None:
        while self.pool is not None and self.next < len(self.entries) and len(self.pending) < self.ahead:
            try:
                self.pending.append(self.pool.submit(self.loader, self.entries[self.next]))
            except BrokenProcessPool:  # broken since: :meth:`get` restarts it
                return
            self.next += 1

    def _restart(self) -> None:
        """A fresh pool; the loads queued in the broken one are sent again by :meth:`_fill`."""
        assert self.pool is not None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.next -= len(self.pending)
        self.pending.clear()
        self.restarts += 1
        self.pool = self._start()

    def get(self, i: int) -> tuple[str, Any]:
        """The load result of ``entries[i]`` (called with i = 0, 1, 2, ... in order)."""
        if self.pool is None:
            return self.loader(self.entries[i])
        try:
            if self.pending:
                out = self._result(self.pending.popleft(), i)
            else:  # the pool broke while it was being filled
                self.next = i + 1
                out = self._result(self.pool.submit(self.loader, self.entries[i]), i)
        except BrokenProcessPool:  # a worker died: this entry or one queued beside it
            self._restart()
            try:
                out = self._result(self.pool.submit(self.loader, self.entries[i]), i)
            except BrokenProcessPool:  # alone in a fresh pool: this entry kills its worker
                self._restart()
                out = "error", f"{entry_path(self.entries[i])}: could not be loaded (its decoding process died)"
        self._fill()
        return out

    def _result(self, fut: Future[tuple[str, Any]], i: int) -> tuple[str, Any]:
        try:
            return fut.result()
        except BrokenProcessPool:
            raise
        except Exception as exc:  # noqa: BLE001 - a worker reports, never takes the run down
            return "error", f"{entry_path(self.entries[i])}: could not be loaded ({type(exc).__name__}: {exc})"

    def close(self) -> None:
        """Stop the workers."""
        if self.pool is not None:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class BackgroundWriter:
    """Runs write jobs on one background thread, at most ``ahead`` waiting, so encoding and
    writing a study overlaps computing the next (torch, zlib and PNG encoding release the GIL).

    :meth:`submit` queues ``fn`` under ``tag`` and returns the outcomes ``(tag, error or None)``
    of the jobs finished by then, in order (it waits for the oldest while more than ``ahead``
    are queued); :meth:`drain` waits for the rest. ``threaded=False`` runs each job at once."""

    def __init__(self, ahead: int = 1, threaded: bool = True) -> None:
        self.ahead = max(0, ahead)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-writer") if threaded else None
        self.pending: deque[tuple[Any, Future[Any]]] = deque()
        self.stopped: BaseException | None = None

    def _run(self, fn: Any) -> Any:
        """``fn()`` on the thread; after a KeyboardInterrupt/SystemExit no later job starts."""
        if self.stopped is not None:
            raise self.stopped
        try:
            return fn()
        except Exception:
            raise
        except BaseException as exc:
            self.stopped = exc
            raise

    def submit(self, tag: Any, fn: Any) -> list[tuple[Any, BaseException | None]]:
        """Queue ``fn()``; the outcomes of the jobs finished so far."""
        if self.pool is None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported per study by the caller
                return [(tag, exc)]
            return [(tag, None)]
        self.pending.append((tag, self.pool.submit(self._run, fn)))
        done = []
        while self.pending and (len(self.pending) > self.ahead or self.pending[0][1].done()):
            done.append(self._pop())
        return done

    def _pop(self) -> tuple[Any, BaseException | None]:
        tag, fut = self.pending.popleft()
        exc = fut.exception()
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: stop the run as in a single thread
        return tag, exc

    def drain(self) -> list[tuple[Any, BaseException | None]]:
        """Wait for every queued job; their outcomes in order."""
        return [self._pop() for _ in range(len(self.pending))]

    def close(self) -> None:
        """Finish the job that is running, drop those not started, and stop the thread."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def stderr_or_none(quiet: bool) -> TextIO | None:
    """Where progress goes."""
    return None if quiet else sys.stderr
