"""The GUI learns when an edit is durable; a failed fsync is reported and the view reloaded."""
from __future__ import annotations

from pathlib import Path

from tests.gui.test_annotate_screen import annotating, demo_results

__all__ = ["annotating", "demo_results"]  # pytest fixtures, shared


def test_edit_shown_at_once_then_durable(qtbot, annotating):
    _host, ctrl, _study = annotating
    syncer = ctrl.session.syncer
    assert syncer is not None
    n = len(ctrl.store.boxes(ctrl.record.id))
    with qtbot.waitSignal(ctrl.durable, timeout=5000):
        ctrl.add_box("Nodule", 20, 30, 40, 35)
    assert len(ctrl.store.boxes(ctrl.record.id)) == n + 1
    assert ctrl.session.flush(5) and syncer.durable == syncer.submitted
    qtbot.waitUntil(lambda: ctrl.dock.save_state == "saved", timeout=5000)
    assert ctrl.dock.save_label.text() == "all edits saved"


def test_dock_says_saving_until_the_sync_thread_is_done(qtbot, annotating, monkeypatch):
    import threading

    _host, ctrl, _study = annotating
    gate = threading.Event()
    real = ctrl.session.syncer._sync
    monkeypatch.setattr(ctrl.session.syncer, "_sync", lambda path: (gate.wait(5), real(path)))
    ctrl.add_box("Nodule", 20, 30, 40, 35)
    assert ctrl.dock.save_state == "saving" and ctrl.dock.save_label.text() == "saving…"
    gate.set()
    qtbot.waitUntil(lambda: ctrl.dock.save_state == "saved", timeout=5000)


def test_failed_sync_reported_and_view_reloaded(qtbot, annotating, monkeypatch):
    _host, ctrl, _study = annotating
    errors: list[str] = []
    refreshed: list[bool] = []
    monkeypatch.setattr(ctrl.feedback, "error", errors.append)
    real_refresh = ctrl.edits.refresh
    monkeypatch.setattr(ctrl.edits, "refresh", lambda *a, **k: (refreshed.append(True),
                                                                real_refresh(*a, **k)))

    def broken(_path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ctrl.session.syncer, "_sync", broken)
    with qtbot.waitSignal(ctrl.syncFailed, timeout=5000):
        ctrl.add_box("Nodule", 20, 30, 40, 35)
    qtbot.waitUntil(lambda: bool(errors), timeout=5000)
    assert "No space left" in errors[-1] and refreshed
    assert ctrl.dock.save_state == "failed" and "No space left" in ctrl.dock.save_label.text()
    monkeypatch.undo()  # the disk has room again: the next edit's fsync covers the failed one's
    with qtbot.waitSignal(ctrl.durable, timeout=5000):
        ctrl.add_box("Nodule", 80, 30, 40, 35)
    qtbot.waitUntil(lambda: ctrl.dock.save_state == "saved", timeout=5000)
