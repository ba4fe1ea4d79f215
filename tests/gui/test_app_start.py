"""The first command on a stock machine: a one-line message instead of Qt's abort when the xcb
plugin's system libraries or the display are missing, and a missing demo study said in the
status bar (issue 14)."""
from __future__ import annotations

import ctypes

import pytest

from cxrviewer.gui import app as gui_app

ABSENT = {"libxcb-icccm.so.4", "libxcb-keysyms.so.1"}  # what a stock Debian 12 lacked


def _present(soname: str) -> bool:
    return soname not in ABSENT


@pytest.fixture
def x11(monkeypatch):
    """An X11 session: Qt would pick its xcb plugin."""
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setattr(gui_app.sys, "platform", "linux")


def test_missing_xcb_libraries_named_with_the_apt_command():
    msg = gui_app.display_problem({"DISPLAY": ":0"}, "linux", present=_present)
    assert msg == ("cxrviewer: Qt cannot start its display plugin (xcb): missing libxcb-icccm.so.4, "
                   "libxcb-keysyms.so.1. Install them with: sudo apt-get install libxcb-icccm4 libxcb-keysyms1")


def test_every_library_present_is_no_problem(monkeypatch):
    monkeypatch.setattr(gui_app, "_plugin_load_error", lambda: None)
    assert gui_app.display_problem({"DISPLAY": ":0"}, "linux", present=lambda s: True) is None
    assert gui_app.display_problem({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}, "linux",
                                   present=lambda s: True) is None


def test_a_library_the_table_does_not_know_is_named(monkeypatch):
    def fail(path, *a, **k):
        raise OSError("libxcb-cursor2.so.9: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", fail)
    assert gui_app._plugin_load_error() == "libxcb-cursor2.so.9"
    msg = gui_app.display_problem({"DISPLAY": ":0"}, "linux", present=lambda s: True)
    assert "missing libxcb-cursor2.so.9" in msg and "\n" not in msg


def test_no_display_is_one_line_suggesting_self_test():
    msg = gui_app.display_problem({}, "linux", present=_present)
    assert msg.startswith("cxrviewer: no display") and "--self-test" in msg and "offscreen" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("env,platform", [
    ({"QT_QPA_PLATFORM": "offscreen"}, "linux"),               # tests, --self-test
    ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, "linux"),  # Qt uses its Wayland plugin
    ({"QT_QPA_PLATFORM": "wayland", "WAYLAND_DISPLAY": "wayland-0"}, "linux"),
    ({}, "win32"),
    ({}, "darwin"),
])
def test_not_checked_where_xcb_is_not_used(env, platform):
    assert gui_app.display_problem(env, platform, present=lambda s: False) is None


def test_first_command_exits_1_with_one_line(x11, monkeypatch, capsys):
    from cxrviewer.__main__ import main

    monkeypatch.setattr(gui_app, "library_present", _present)
    assert main(["--demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libxcb-icccm.so.4" in err[0] and "sudo apt-get install libxcb-icccm4" in err[0]


def test_library_present_finds_libc_and_not_a_made_up_name():
    assert gui_app.library_present("libc.so.6")
    assert not gui_app.library_present("libcxrviewer-does-not-exist.so.7")


def test_missing_demo_study_is_said_in_the_status_bar(qtbot, monkeypatch):
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QLabel

    from cxrviewer.gui.main_window import MainWindow

    monkeypatch.setattr(gui_app, "find_demo", lambda: ([], ["resources/demo_dicom/"]))
    seen: list[str] = []

    def read_and_close() -> None:
        wins = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if not wins:
            QTimer.singleShot(20, read_and_close)
            return
        label = wins[-1].statusBar().findChild(QLabel, "demoMissing")
        seen.append(label.text() if label is not None and label.isVisible() else "")
        wins[-1].close()

    QTimer.singleShot(0, read_and_close)
    safety = QTimer()
    safety.setSingleShot(True)
    safety.timeout.connect(QApplication.instance().quit)
    safety.start(20_000)
    try:
        assert gui_app.run_gui([], demo=True) == 0
    finally:
        safety.stop()
    assert seen and "resources/demo_dicom/" in seen[0] and "missing" in seen[0]


def test_run_gui_reopens_the_last_project(qtbot, tmp_path, monkeypatch):
    """The annotation project of the last session is open again when the app starts."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.gui import settings
    from cxrviewer.gui.main_window import MainWindow

    monkeypatch.setattr(gui_app, "display_problem", lambda *a, **k: None)
    project = tmp_path / "last.cxrann"
    AnnotationStore(project).close()
    settings.app_settings().setValue("annotation/last_store", str(project))
    seen: list[str | None] = []

    def close_when_shown():
        wins = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if wins:
            store = wins[-1].annotations.store
            seen.append(str(store.path) if store is not None else None)
            wins[-1].close()
        else:
            QTimer.singleShot(20, close_when_shown)

    QTimer.singleShot(0, close_when_shown)
    safety = QTimer()
    safety.setSingleShot(True)
    safety.timeout.connect(QApplication.instance().quit)
    safety.start(20_000)
    try:
        assert gui_app.run_gui([], demo=False) == 0
    finally:
        safety.stop()
        settings.app_settings().remove("annotation/last_store")
    assert seen == [str(project)]
