"""Desktop habits (issue 20): a rotating log file the user can find, File > Recent studies and
projects, and a window that reopens as the user left it. Every test has its own settings, data
and log folders (CXRVIEWER_CONFIG_DIR / DATA_DIR / LOG_DIR)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from cxrviewer import selftest
from cxrviewer.core import logfile
from cxrviewer.core.display import DisplayData
from cxrviewer.core.results import Results
from cxrviewer.gui import app as gui_app
from cxrviewer.gui import main_window as mw
from cxrviewer.gui import recent
from cxrviewer.gui.main_window import DEFAULT_SIZE, MainWindow


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Fresh settings, data, cache and log folders; the log handler removed afterwards."""
    dirs = {name: tmp_path / name for name in ("config", "data", "cache", "logs")}
    for var, key in (("CXRVIEWER_CONFIG_DIR", "config"), ("CXRVIEWER_DATA_DIR", "data"),
                     ("CXRVIEWER_CACHE_DIR", "cache"), ("CXRVIEWER_LOG_DIR", "logs")):
        monkeypatch.setenv(var, str(dirs[key]))
    yield dirs
    logfile.remove_log_file()


def _png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(path)
    return path


def _window(qtbot) -> MainWindow:
    win = MainWindow()
    qtbot.addWidget(win)
    return win


def _run_gui_once(monkeypatch, inspect) -> int:
    """run_gui whose window calls ``inspect(window)`` once shown, then closes itself."""
    class Inspected(MainWindow):
        def showEvent(self, event) -> None:  # noqa: N802 - Qt naming
            super().showEvent(event)
            QTimer.singleShot(0, self._inspect_and_close)

        def _inspect_and_close(self) -> None:
            inspect(self)
            self.close()

    monkeypatch.setattr(mw, "MainWindow", Inspected)  # run_gui imports it when called
    guard = QTimer()  # never hang the suite (stopped before a later test's event loop runs)
    guard.setSingleShot(True)
    guard.timeout.connect(QApplication.instance().quit)
    guard.start(20_000)
    try:
        return gui_app.run_gui([], demo=False)
    finally:
        guard.stop()


# ---- the log file ----------------------------------------------------------------------------
def test_log_folder_per_platform_and_overrides():
    home = {"HOME": "/home/u"}
    assert logfile.user_log_dir(home, "linux") == Path("/home/u/.local/state/cxrviewer/log")
    assert logfile.user_log_dir({**home, "XDG_STATE_HOME": "/s"}, "linux") == Path("/s/cxrviewer/log")
    assert logfile.user_log_dir(home, "darwin") == Path("/home/u/Library/Logs/cxrviewer")
    assert logfile.user_log_dir({"LOCALAPPDATA": "C:/L"}, "win32") == Path("C:/L/cxrviewer/Logs")
    assert logfile.user_log_dir({**home, "CXRVIEWER_CONFIG_DIR": "/c"}, "linux") == Path("/c/logs")
    assert logfile.user_log_dir({**home, "CXRVIEWER_CONFIG_DIR": "/c", "CXRVIEWER_LOG_DIR": "/l"},
                                "linux") == Path("/l")


def test_log_file_rotates_at_its_size(tmp_path):
    try:
        got = logfile.install_log_file(tmp_path, max_bytes=2000, backups=2)
        assert got.path == tmp_path / "cxrviewer.log" and not got.error
        for i in range(100):
            logging.getLogger("cxrviewer.test").warning("line %03d %s", i, "x" * 40)
    finally:
        logfile.remove_log_file()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cxrviewer.log", "cxrviewer.log.1", "cxrviewer.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert "line 099" in (tmp_path / "cxrviewer.log").read_text(encoding="utf-8")


def test_log_file_exists_after_a_gui_session(qtbot, folders, monkeypatch):
    seen: list[str] = []

    def inspect(win: MainWindow) -> None:
        logging.getLogger("cxrviewer.test").warning("a message of this session")
        seen.append(str(logfile.installed_log_file()))

    assert _run_gui_once(monkeypatch, inspect) == 0
    path = folders["logs"] / "cxrviewer.log"
    assert seen == [str(path)]
    text = path.read_text(encoding="utf-8")
    assert "WARNING cxrviewer.test" in text and "a message of this session" in text


def test_unwritable_log_folder_is_a_warning_not_a_failure(qtbot, folders, monkeypatch):
    blocker = folders["config"].parent / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    monkeypatch.setenv("CXRVIEWER_LOG_DIR", str(blocker / "logs"))
    messages: list[tuple[str, str]] = []

    def inspect(win: MainWindow) -> None:
        QApplication.processEvents()  # the queued log-panel signal
        messages.extend(win.log_panel.messages)

    assert _run_gui_once(monkeypatch, inspect) == 0
    assert logfile.installed_log_file() is None
    assert any(level == "warning" and "No log file this session" in text and str(blocker) in text
               for level, text in messages), messages


def test_selftest_writes_its_verdict_to_the_log(folders, monkeypatch, capsys):
    fake = {"ok": False, "failed": ["qt"], "total_seconds": 0.1,
            "checks": [{"name": "environment", "ok": True, "seconds": 0.0},
                       {"name": "qt", "ok": False, "seconds": 0.0, "error": "RuntimeError: no display plugin"}]}
    monkeypatch.setattr(selftest, "run_selftest", lambda **kw: dict(fake))
    assert selftest.main(["--tiny", "--no-gui"]) == 1
    report = json.loads(capsys.readouterr().out)
    path = folders["logs"] / "cxrviewer.log"
    assert report["log_file"] == str(path)
    text = path.read_text(encoding="utf-8")
    assert "self-test FAILED: qt" in text and "check qt failed: RuntimeError: no display plugin" in text


def test_help_open_log_folder_opens_the_folder(qtbot, folders, monkeypatch):
    opened: list[str] = []

    class FakeServices:
        @staticmethod
        def openUrl(url):  # noqa: N802 - Qt's name
            opened.append(url.toLocalFile())
            return True

    monkeypatch.setattr(mw, "QDesktopServices", FakeServices)
    win = _window(qtbot)
    assert win.act_open_log in win.help_menu.actions()
    win.act_open_log.trigger()
    assert opened == [str(folders["logs"])] and folders["logs"].is_dir()


# ---- recent files ------------------------------------------------------------------------------
def test_recent_list_is_newest_first_without_duplicates_and_capped(folders):
    for i in range(12):
        recent.add_recent(recent.STUDIES, [f"/x/s{i}.png"])
    recent.add_recent(recent.STUDIES, ["/x/s5.png"])
    entries = recent.recent_entries(recent.STUDIES)
    assert len(entries) == recent.MAX_RECENT == 10
    assert entries[0] == [str(Path("/x/s5.png"))] and entries[1] == [str(Path("/x/s11.png"))]
    assert entries.count([str(Path("/x/s5.png"))]) == 1


def test_missing_recent_entry_is_disabled_and_dropped_with_a_note(qtbot, folders, tmp_path):
    present = _png(tmp_path / "present.png")
    gone = _png(tmp_path / "gone.png", 1)
    recent.add_recent(recent.STUDIES, [gone])
    recent.add_recent(recent.STUDIES, [present])
    gone.unlink()
    win = _window(qtbot)
    menu = win.recent_studies_menu
    menu.rebuild()
    acts = [a for a in menu.actions() if isinstance(a.data(), list)]
    assert [a.isEnabled() for a in acts] == [True, False] and "not found" in acts[1].text()
    assert menu.choose([str(gone)]) is False
    assert recent.recent_entries(recent.STUDIES) == [[str(present)]]
    assert any("not found" in text for _, text in win.log_panel.messages)
    menu.clear_list()
    assert recent.recent_entries(recent.STUDIES) == [] and not menu.clear_action.isEnabled()


def test_recent_project_menu_reopens_the_project(qtbot, folders, tmp_path):
    from cxrviewer.core.annotations import AnnotationStore

    project = tmp_path / "p.cxrann"
    AnnotationStore(project).close()
    recent.add_recent(recent.PROJECTS, [project])
    win = _window(qtbot)
    assert win.recent_projects_menu.entries() == [[str(project)]]
    assert win.recent_projects_menu.choose([str(project)]) is True
    assert win.annotations.store is not None and Path(win.annotations.store.path) == project
    win.annotations.close_store()


# ---- the window as the user left it ----------------------------------------------------------
def _results(classes: tuple[str, ...]) -> Results:
    return Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(48, 40),
                   map_shape=(48, 40), classes=classes, probabilities=np.linspace(0.9, 0.1, len(classes)))


def test_recent_files_and_layout_survive_a_restart(qtbot, folders, tmp_path):
    from cxrviewer.core.annotations import AnnotationStore

    study = _png(tmp_path / "study.png")
    project = tmp_path / "proj.cxrann"
    AnnotationStore(project).close()
    first = _window(qtbot)
    assert first.restore_session() is False  # a first start: nothing saved yet
    first.show()
    first.open_paths([str(study)])
    assert first.annotations.open_store(project, create=False)
    first.set_layout("2x2")
    first.focus_combo.setCurrentIndex(2)
    focus = first.focus_combo.currentData()
    cmap = first.cmap_combo.itemData(first.cmap_combo.count() - 1)
    first.cmap_combo.setCurrentIndex(first.cmap_combo.count() - 1)
    first.opacity_slider.setValue(35)
    first.scale_combo.setCurrentIndex(first.scale_combo.count() - 1)
    scale = first.scale_combo.currentData()
    first._show_results(_results(("Atelectasis", "Effusion", "Mass")), DisplayData())
    first.select_class(1)
    first.resize(600, 450)
    size = first.size()
    qtbot.waitUntil(lambda: len(first.state.worklist) == 1, timeout=10_000)
    first.close()

    second = _window(qtbot)
    assert second.restore_session() is True
    assert second.size() == size
    assert second.grid.layout_name == "2x2" and second.user_layout() == "2x2"
    assert second.layout_combo.currentData() == "2x2"
    assert second.focus_combo.currentData() == focus and second.grid.focus_key == focus
    assert second.cmap_combo.currentData() == cmap and second.grid.colormap_name == cmap
    assert second.opacity_slider.value() == 35 and second.grid.opacity == pytest.approx(0.35)
    assert second.scale_combo.currentData() == scale and second.grid.scale_mode == scale
    assert second.recent_studies_menu.entries() == [[str(study)]]
    assert second.recent_projects_menu.entries() == [[str(project)]]
    second._show_results(_results(("Mass", "Effusion")), DisplayData())  # another model set, same class
    assert second.grid.class_name == "Effusion"
    second.close()


def test_class_the_model_lacks_falls_back_to_the_top_finding(qtbot, folders):
    win = _window(qtbot)
    win.restore_class("Hernia")
    win._show_results(_results(("Mass", "Effusion")), DisplayData())
    assert win.grid.class_name == "Mass" and win.user_class() == ""


def test_a_layout_left_to_the_model_set_stays_automatic(qtbot, folders):
    first = _window(qtbot)
    first.restore_session()
    first.close()
    second = _window(qtbot)
    second.restore_session()
    assert second.user_layout() == ""  # still follows the model set (grid with models, 1x1 without)


def test_saved_geometry_off_every_screen_falls_back_to_the_default(qtbot, folders):
    first = _window(qtbot)
    first.restore_session()
    first.show()
    avail = first.screen().availableGeometry()
    first.resize(avail.width() * 3, avail.height() * 3)
    first.close()
    second = _window(qtbot)
    assert second.restore_session() is False
    assert (second.width(), second.height()) == DEFAULT_SIZE
    second.show()  # the first-start fit: into the screen
    assert second.width() <= avail.width() and second.height() <= avail.height()


def test_a_project_given_like_a_study_opens_as_the_annotation_project(qtbot, folders, tmp_path):
    """`cxrviewer PROJECT.cxrann` (the .deb's file association): the project opens, no study is
    looked for; a missing project is an error and is never created."""
    from cxrviewer.core.annotations import AnnotationStore

    project = tmp_path / "p.cxrann"
    AnnotationStore(project).close()
    win = _window(qtbot)
    assert win.open_paths([str(project)]) == 0  # nothing left to open as studies
    assert win.annotations.store is not None and Path(win.annotations.store.path) == project
    missing = tmp_path / "typo.cxrann"
    win.open_paths([str(missing)])
    assert not missing.exists()
    win.annotations.close_store()
