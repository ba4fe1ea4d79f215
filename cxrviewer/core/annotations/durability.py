"""Background durability for the annotation store (Qt-free).

With ``synchronous=NORMAL`` in WAL mode a commit returns as soon as its frames are
in the WAL (in the OS cache): it already survives a killed process, but not a power
cut. :class:`WalSyncer` runs one background thread that fsyncs the WAL, the database
file and their folder after each commit and only then acknowledges the edit as
*durable*, in commit order (tickets are increasing; one fsync covers every ticket
submitted before it). So the GUI thread never waits on the disk, and whatever the
GUI calls "saved" has been fsynced.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

#: ``on_durable(ticket)``: every edit up to ``ticket`` is on disk.
DurableFn = Callable[[int], None]
#: ``on_error(ticket, exc)``: the fsync for edits up to ``ticket`` failed.
ErrorFn = Callable[[int, BaseException], None]


#: folders can be opened and fsynced (POSIX); Windows cannot open one (PermissionError)
FSYNC_FOLDERS = os.name == "posix"


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync one file (or folder) by path; a missing file has nothing to sync. Folders are
    fsynced on POSIX only (Windows cannot open one, and NTFS orders the metadata itself)."""
    if directory and not FSYNC_FOLDERS:
        return
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_store(path: Path) -> None:
    """Make every commit already written to the store at ``path`` durable."""
    _fsync_path(Path(str(path) + "-wal"))
    _fsync_path(path)
    _fsync_path(path.parent, directory=True)


class WalSyncer:
    """A single writer thread that fsyncs a WAL store after commits, in order."""

    def __init__(self, path: str | os.PathLike, on_durable: DurableFn | None = None,
                 on_error: ErrorFn | None = None,
                 sync: Callable[[Path], None] = fsync_store) -> None:
        self.path = Path(path)
        self._on_durable, self._on_error, self._sync = on_durable, on_error, sync
        self._cond = threading.Condition()
        self._submitted = self._durable = self._failed = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="cxr-store-sync", daemon=True)
        self._thread.start()

    @property
    def durable(self) -> int:
        """The highest ticket known to be on disk."""
        with self._cond:
            return self._durable

    @property
    def submitted(self) -> int:
        with self._cond:
            return self._submitted

    def submit(self) -> int:
        """Ask for the commits made so far to become durable; returns their ticket."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the store syncer is closed")
            self._submitted += 1
            self._cond.notify_all()
            return self._submitted

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._submitted == max(self._durable, self._failed) and not self._closing:
                    self._cond.wait()
                target = self._submitted
                if target == max(self._durable, self._failed) and self._closing:
                    return
            try:
                self._sync(self.path)
            except BaseException as exc:  # noqa: BLE001 - reported, never lost silently
                with self._cond:
                    self._failed = target
                    self._cond.notify_all()
                if self._on_error is not None:
                    self._on_error(target, exc)
                continue
            with self._cond:
                self._durable = target
                self._cond.notify_all()
            if self._on_durable is not None:
                self._on_durable(target)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted ticket is synced (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: max(self._durable, self._failed) >= self._submitted, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread (idempotent); False if the flush timed out."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
