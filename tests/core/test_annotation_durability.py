"""Background durability: edits apply at once, are fsynced off the caller's thread, in order."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cxrviewer.core.annotations import AnnotationStore, StudyIdentity
from cxrviewer.core.annotations.durability import WalSyncer, fsync_store
from cxrviewer.core.annotations.session import AnnotationSession


def _session(tmp_path: Path, **kw) -> tuple[AnnotationSession, int]:
    ses = AnnotationSession("tester")
    store = ses.open(tmp_path / "p.cxrann", background_sync=True, **kw)
    rec = store.ensure_study(StudyIdentity(file_name="a.dcm", sop_uid="1.2.3"), width=100, height=100)
    return ses, rec.id


def test_edit_applied_at_once_and_acknowledged_after_flush(tmp_path: Path) -> None:
    acks: list[int] = []
    ses, sid = _session(tmp_path, on_durable=acks.append)
    assert ses.store is not None and ses.store._pragma("synchronous") == 1  # NORMAL
    b = ses.store.add_box(sid, "Mass", 1, 2, 3, 4)
    assert b is not None and len(ses.store.boxes(sid)) == 1  # visible before it is durable
    assert ses.flush(5)
    assert ses.syncer is not None and ses.syncer.durable == ses.syncer.submitted >= 2
    assert acks and acks[-1] == ses.syncer.submitted and acks == sorted(acks)
    ses.close()


def test_tickets_acknowledged_in_order(tmp_path: Path) -> None:
    seen: list[int] = []
    gate = threading.Event()

    def slow(path: Path) -> None:
        gate.wait(5)
        fsync_store(path)

    (tmp_path / "s.cxrann").touch()
    syncer = WalSyncer(tmp_path / "s.cxrann", seen.append, sync=slow)
    tickets = [syncer.submit() for _ in range(5)]
    assert tickets == [1, 2, 3, 4, 5] and syncer.durable == 0  # nothing claimed before the fsync
    gate.set()
    assert syncer.flush(5) and syncer.durable == 5
    assert seen == sorted(seen) and seen[-1] == 5
    assert syncer.close(5)


def test_failed_sync_reported(tmp_path: Path) -> None:
    errors: list[tuple[int, str]] = []

    def broken(_path: Path) -> None:
        raise OSError(28, "No space left on device")

    syncer = WalSyncer(tmp_path / "x.cxrann", on_error=lambda t, e: errors.append((t, str(e))),
                       sync=broken)
    t = syncer.submit()
    assert syncer.flush(5)
    assert syncer.durable == 0 and errors and errors[0][0] == t and "No space" in errors[0][1]
    assert syncer.close(5)


def test_close_flushes_and_edits_survive(tmp_path: Path) -> None:
    acks: list[int] = []
    ses, sid = _session(tmp_path, on_durable=acks.append)
    for i in range(10):
        ses.store.add_box(sid, "Mass", i, i, 5, 5)  # type: ignore[union-attr]
    syncer = ses.syncer
    assert ses.close()
    assert syncer is not None and syncer.durable == syncer.submitted and acks[-1] == syncer.durable
    with pytest.raises(RuntimeError):
        syncer.submit()
    with AnnotationStore(tmp_path / "p.cxrann") as s:
        assert len(s.boxes(sid)) == 10


def test_default_store_stays_full(tmp_path: Path) -> None:
    with AnnotationStore(tmp_path / "f.cxrann") as s:
        assert s._pragma("synchronous") == 2 and s.on_commit is None


def test_folders_are_not_opened_for_fsync_outside_posix(tmp_path, monkeypatch):
    """Windows cannot open a folder (PermissionError): the store's sync must not report that as a
    failed save on every edit."""
    from cxrviewer.core.annotations import durability

    opened: list[str] = []
    real_open = durability.os.open
    monkeypatch.setattr(durability, "FSYNC_FOLDERS", False)  # what Windows gets
    monkeypatch.setattr(durability.os, "open", lambda p, *a: (opened.append(str(p)), real_open(p, *a))[1])
    db = tmp_path / "p.cxrann"
    db.write_bytes(b"x")
    durability.fsync_store(db)
    assert str(db) in opened and str(tmp_path) not in opened  # the files, never the folder
    monkeypatch.setattr(durability, "FSYNC_FOLDERS", True)  # POSIX: the folder too
    opened.clear()
    durability.fsync_store(db)
    assert str(tmp_path) in opened
