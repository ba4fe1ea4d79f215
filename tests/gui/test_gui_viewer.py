"""The viewer window: opening, loading off-thread, window/level, navigation, errors.

Offscreen Qt (tests/conftest.py). No sleeps: qtbot.waitSignal / waitUntil.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import pytest
from PIL import Image
from PySide6.QtCore import QEvent, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from cxrviewer.core import io as cio
from cxrviewer.core.geometry import Box
from cxrviewer.core.io.worklist import StudyRef, Worklist
from cxrviewer.core.study import Study, StudyMeta
from cxrviewer.gui import windowing as wl
from cxrviewer.gui.main_window import MainWindow

pg.setConfigOption("mouseRateLimit", 0)

LOAD_TIMEOUT_MS = 30_000


# ---- helpers ------------------------------------------------------------------
def make_study(shape=(64, 80), *, invert=False, boxes=(), seed=0, name="fake") -> Study:
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    modality = stored.astype(np.float32)
    meta = StudyMeta(source_path=f"/fake/{name}.png", format="png",
                     photometric="MONOCHROME1" if invert else "MONOCHROME2", bits_stored=12)
    return Study(stored=stored, modality=modality, model_input=modality / 4095.0,
                 window=(2048.0, 4096.0), invert_display=invert, meta=meta,
                 gt_boxes=list(boxes), study_id=name)


def fake_worklist(n: int) -> Worklist:
    refs = [StudyRef(path=Path(f"/fake/s{i}.png"), key=f"s{i}", display_name=f"s{i}") for i in range(n)]
    return Worklist(refs=refs, source="fake")


@pytest.fixture
def fake_io(monkeypatch):
    """load_study/open_worklist replaced by in-memory fakes (no file I/O)."""
    def load_study(path, *, timeout=30.0):
        idx = int(Path(path).stem[1:])
        return make_study(seed=idx, name=Path(path).stem)

    def open_worklist(paths):
        return fake_worklist(len(paths))

    monkeypatch.setattr(cio, "load_study", load_study, raising=False)
    monkeypatch.setattr(cio, "open_worklist", open_worklist, raising=False)


@pytest.fixture
def win(qtbot):
    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.activateWindow()
    yield w
    w.close()


@pytest.fixture
def png16(tmp_path) -> Path:
    """A 16-bit greyscale PNG (two dark 'lungs' in a bright body), always available."""
    yy, xx = np.mgrid[0:200, 0:160]
    img = np.full((200, 160), 30000, dtype=np.uint16)
    for cx in (50, 110):
        img[((xx - cx) / 28.0) ** 2 + ((yy - 95) / 60.0) ** 2 < 1] = 9000
    img[:, :8] = 500
    img = img + (xx * 40).astype(np.uint16)
    p = tmp_path / "chest16.png"
    Image.fromarray(img).save(p)
    assert Image.open(p).mode.startswith("I")  # really 16-bit
    return p


def require_io():
    if not hasattr(cio, "open_worklist") or not hasattr(cio, "load_study"):
        pytest.fail("cxrviewer.core.io.open_worklist/load_study are missing")


def open_and_wait(qtbot, win: MainWindow, paths) -> Study:
    require_io()
    with qtbot.waitSignal(win.state.studyChanged, timeout=LOAD_TIMEOUT_MS,
                          check_params_cb=lambda s: s is not None) as blocker:
        win.open_paths([str(p) for p in paths])
    return blocker.args[0]


def levels(win: MainWindow) -> tuple[float, float]:
    lo, hi = win.panel.image_item.getLevels()
    return float(lo), float(hi)


def send_mouse(widget, kind, pos: QPointF, button, buttons) -> None:
    ev = QMouseEvent(kind, pos, widget.mapToGlobal(pos), button, buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, ev)


def right_drag(qtbot, panel, dx: float, dy: float, steps: int = 5,
               rb=Qt.MouseButton.RightButton) -> None:
    vp = panel.viewport()
    start = QPointF(vp.width() / 2, vp.height() / 2)
    send_mouse(vp, QEvent.Type.MouseButtonPress, start, rb, rb)
    for i in range(1, steps + 1):
        send_mouse(vp, QEvent.Type.MouseMove, start + QPointF(dx * i / steps, dy * i / steps),
                   Qt.MouseButton.NoButton, rb)
    send_mouse(vp, QEvent.Type.MouseButtonRelease, start + QPointF(dx, dy), rb, Qt.MouseButton.NoButton)


# ---- pure window/level maths ------------------------------------------------------
def test_presets_follow_density_axis():
    rng = wl.DataRange(0.0, 1000.0, 100.0, 900.0)
    lung = wl.PRESETS[4]  # bone: centre_frac != 0.5, so the two polarities differ
    c2, w2 = wl.preset_window(lung, rng, (500.0, 1000.0), invert_display=False)
    c1, w1 = wl.preset_window(lung, rng, (500.0, 1000.0), invert_display=True)
    assert w1 == w2 == pytest.approx(lung.width_frac * 800)
    assert c2 == pytest.approx(100 + lung.centre_frac * 800)  # MONOCHROME2: low values = air
    assert c1 == pytest.approx(900 - lung.centre_frac * 800)  # MONOCHROME1: reversed
    assert c1 != pytest.approx(c2)
    assert wl.preset_window(wl.PRESETS[1], rng, (1, 1), False) == (500.0, 1000.0)


def test_drag_is_proportional_to_width():
    rng = wl.DataRange(0.0, 1e5, 0.0, 1e5)
    c_a, _ = wl.drag_window((100.0, 100.0), 0, 10, rng)
    c_b, _ = wl.drag_window((100.0, 200.0), 0, 10, rng)
    assert (c_b - 100.0) == pytest.approx(2 * (c_a - 100.0))
    _, w = wl.drag_window((100.0, 100.0), 20, 0, rng)
    assert w > 100.0
    _, w_small = wl.drag_window((100.0, 100.0), -1e6, 0, rng)
    assert w_small == pytest.approx(wl.min_width(rng))


# ---- window and fake-loader behaviour ------------------------------------------------
def test_help_lists_every_preset_and_opens_non_modal(win):
    from cxrviewer.gui.main_window import shortcuts_html

    html = shortcuts_html()
    assert all(p.name in html for p in wl.PRESETS) and "Right drag" in html
    win.act_shortcuts.trigger()
    assert win._help.isVisible() and not win._help.isModal()
    win.act_about.trigger()  # non-modal too: returns at once
    assert any(b.isVisible() and "cxrviewer" in b.text() for b in win.findChildren(QMessageBox))


def test_window_has_menus_docks_and_status_bar(win):
    titles = [a.text().replace("&", "") for a in win.menuBar().actions()]
    assert titles == ["File", "View", "Annotate", "Help"]  # Annotate: issue 6
    assert win.windowTitle() == "cxrviewer"
    assert win.study_dock.widget() is win.study_list
    assert win.study_list.headerItem().text(1) == "Labels"
    assert win.statusBar() is not None
    vb = win.panel.view
    assert vb.state["aspectLocked"] and vb.state["yInverted"]
    assert vb.state["autoRange"] == [False, False]
    assert win.runner.pool.maxThreadCount() == 1
    assert win.state.study is None  # no study: no made-up zoom (an empty view's scale is meaningless)
    win.panel.view.scaleBy((0.5, 0.5))
    assert win.zoom_label.text() == "Zoom –"


def test_gt_boxes_drawn_and_toggled(qtbot, win):
    study = make_study((300, 400), boxes=[Box("Nodule", 10, 20, 30, 40), Box("Mass", 100, 50, 60, 70)])
    win.state.set_study(study)
    rects = [i for i in win.panel.gt_boxes.items if hasattr(i, "rect")]
    assert [(r.rect().x(), r.rect().y(), r.rect().width()) for r in rects] == [(10, 20, 30), (100, 50, 60)]
    win.act_gt.trigger()
    assert not win.state.gt_visible
    assert not any(i.isVisible() for i in win.panel.gt_boxes.items)
    # a view change must not move when overlays are added: bounds come from the image only
    r0 = win.panel.view.viewRect()
    win.panel.heatmap.set_heatmap(np.random.default_rng(1).random((7, 7)))
    assert win.panel.view.viewRect() == r0
    assert win.panel.heatmap.item.width() == 7


def test_keys_navigate_and_invert(qtbot, win, fake_io):
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        win.open_paths(["a", "b", "c"])
    assert win.state.current_index == 0
    assert win.study_list.topLevelItemCount() == 3
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        qtbot.keyClick(win.panel, Qt.Key.Key_Right)
    assert win.state.current_index == 1
    assert win.state.study.study_id == "s1"
    assert win.study_list.currentItem().text(0) == "s1"
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        qtbot.keyClick(win.panel, Qt.Key.Key_PageUp)
    assert win.state.study.study_id == "s0"  # from the cache or a new load
    lut0 = win.panel.image_item.lut
    qtbot.keyClick(win.panel, Qt.Key.Key_I)
    assert win.state.invert and win.panel.inverted
    assert int(win.panel.image_item.lut[0]) == 255 and (lut0 is None or int(lut0[0]) == 0)
    z0 = win.panel.zoom_level()
    qtbot.keyClick(win.panel, Qt.Key.Key_Plus)
    assert win.panel.zoom_level() > z0 * 1.1
    assert win.zoom_label.text() == f"Zoom {win.panel.zoom_level() * 100:.0f}%"
    qtbot.keyClick(win.panel, Qt.Key.Key_Space)
    assert not win.state.invert
    assert win.panel.zoom_level() == pytest.approx(z0, rel=1e-3)


def test_stale_results_are_dropped(qtbot, win):
    gate = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        gate.wait(10)
        return "old"

    runner = win.runner
    got = []
    runner.finished.connect(lambda ch, seq, res: got.append(res))
    runner.submit("load", slow)
    qtbot.waitUntil(started.is_set, timeout=5000)
    with qtbot.waitSignal(runner.finished, timeout=5000):
        seq2 = runner.submit("load", lambda: "new")
        gate.set()
    assert got == ["new"] and runner.latest("load") == seq2


def test_generator_jobs_report_progress(qtbot, win):
    def gen():
        yield 1
        yield 2
        return "done"

    items = []
    win.runner.progress.connect(lambda ch, seq, item: items.append(item))
    with qtbot.waitSignal(win.runner.finished, timeout=5000) as blocker:
        win.runner.submit("model", gen)
    assert items == [1, 2] and blocker.args[2] == "done"


def test_close_while_loading_exits_cleanly(qtbot, monkeypatch):
    started, release = threading.Event(), threading.Event()

    def slow_load(path, *, timeout=30.0):
        started.set()
        release.wait(10)
        return make_study()

    monkeypatch.setattr(cio, "load_study", slow_load, raising=False)
    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    w.set_worklist(fake_worklist(1))
    qtbot.waitUntil(started.is_set, timeout=5000)
    assert w.runner.busy
    release.set()
    w.close()
    assert w.runner.pool.activeThreadCount() == 0
    QApplication.processEvents()
    assert w.state.study is None  # the late result was dropped


# ---- real files (cxrviewer.core.io) ---------------------------------------------------
def test_rg1_window_level_keys_and_drag(qtbot, win, rg1_uncr):
    study = open_and_wait(qtbot, win, [rg1_uncr])
    assert win.panel.image_shape == study.shape
    header = wl.levels(study.window)
    assert levels(win) == pytest.approx(header, rel=1e-5)
    assert win.panel.inverted == study.invert_display
    assert "C " in win.wl_label.text()

    qtbot.keyClick(win.panel, Qt.Key.Key_3)  # lung preset
    lung = levels(win)
    assert lung != pytest.approx(header, rel=1e-3)
    assert win.state.preset_name == "Lung"
    qtbot.keyClick(win.panel, Qt.Key.Key_2)  # full range
    assert levels(win) == pytest.approx((float(study.modality.min()), float(study.modality.max())), rel=1e-5)

    # big image at fit zoom: a mean-downsampled level is on screen, covering the full rect
    assert win.panel.zoom_level() < 0.5 and win.panel.display_level >= 1
    shown = win.panel.image_item.mapRectToParent(win.panel.image_item.boundingRect())
    assert shown.width() == pytest.approx(study.shape[1], abs=2 ** win.panel.display_level)
    assert shown.height() == pytest.approx(study.shape[0], abs=2 ** win.panel.display_level)
    for _ in range(10):  # the window fits the offscreen 800 x 800 screen: smaller panels than 1440 x 900
        qtbot.keyClick(win.panel, Qt.Key.Key_Plus)
    assert win.panel.display_level == 0 and win.panel.image_item.image.shape == study.shape
    assert levels(win) == pytest.approx((float(study.modality.min()), float(study.modality.max())), rel=1e-5)
    qtbot.keyClick(win.panel, Qt.Key.Key_F)

    view_before = win.panel.view.viewRect()
    c0, w0 = win.state.window
    right_drag(qtbot, win.panel, 60, 0)  # right = wider
    c1, w1 = win.state.window
    assert w1 > w0 * 1.2 and c1 == pytest.approx(c0)
    right_drag(qtbot, win.panel, 0, 40)  # vertical = centre
    c2, w2 = win.state.window
    assert c2 != pytest.approx(c1) and w2 == pytest.approx(w1)
    assert levels(win) == pytest.approx(wl.levels((c2, w2)), rel=1e-6)
    assert win.panel.view.viewRect() == view_before  # W/L drag never pans or zooms


def test_nih_png_original(qtbot, win, nih_dir):
    pngs = sorted((nih_dir / "png-originals").glob("*.png"))
    if not pngs:
        pytest.skip("no NIH png-originals")
    study = open_and_wait(qtbot, win, [pngs[0]])
    assert win.panel.image_shape == study.shape
    assert win.study_list.status(0) == "ok"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about the garbage
def test_png16_and_corrupt_file(qtbot, win, png16, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    study = open_and_wait(qtbot, win, [png16, bad])
    assert study.shape == (200, 160)
    assert win.panel.image_shape == (200, 160)
    assert levels(win)[1] > 256  # 16-bit values kept in modality units
    with qtbot.waitSignal(win.runner.failed, timeout=LOAD_TIMEOUT_MS):
        qtbot.keyClick(win.panel, Qt.Key.Key_Down)
    assert win.study_list.status(1) == "error"
    assert any(level == "error" for level, _ in win.log_panel.messages)
    assert win.statusBar().currentMessage()
    assert win.isVisible() and win.log_dock.isVisible()
    # still usable: go back to the good study
    with qtbot.waitSignal(win.state.studyChanged, timeout=LOAD_TIMEOUT_MS,
                          check_params_cb=lambda s: s is not None):
        qtbot.keyClick(win.panel, Qt.Key.Key_Up)
    assert win.state.current_index == 0


def test_demo_paths_are_shipped_and_need_no_network(monkeypatch):
    import socket

    import pydicom.data

    from cxrviewer.core.io import load_study
    from cxrviewer.gui.app import demo_paths

    def no_network(*args, **kwargs):
        raise AssertionError("the demo must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(pydicom.data, "get_testdata_file", no_network)
    paths = demo_paths()
    assert paths[0].endswith("demo") and paths[1].endswith("RG1_J2KR.dcm") and len(paths) == 2
    study = load_study(paths[1])  # the real CR chest, MONOCHROME1, decoded locally
    assert study.shape == (1955, 1841) and study.invert_display


def test_right_drag_changes_levels_on_fake_study(qtbot, win):
    win.state.set_study(make_study((256, 256)))
    l0 = levels(win)
    right_drag(qtbot, win.panel, 50, 30)
    assert levels(win) != pytest.approx(l0, rel=1e-3)
    assert levels(win) == pytest.approx(wl.levels(win.state.window), rel=1e-6)


def test_nih_folder_labels_and_gt_boxes(qtbot, win, nih_dir):
    open_and_wait(qtbot, win, [nih_dir])
    refs = win.state.worklist
    row = next((i for i, r in enumerate(refs) if r.gt_boxes), None)
    if row is None:
        pytest.skip("no NIH image with a ground-truth box in this subset")
    assert win.study_list.topLevelItem(row).text(1)  # labels column filled
    with qtbot.waitSignal(win.state.studyChanged, timeout=LOAD_TIMEOUT_MS,
                          check_params_cb=lambda s: s is not None) as blocker:
        win.state.set_current_index(row)
    study = blocker.args[0]
    assert study.gt_boxes
    rects = [i for i in win.panel.gt_boxes.items if hasattr(i, "rect")]
    assert len(rects) == len(study.gt_boxes)
    assert rects[0].rect().x() == pytest.approx(study.gt_boxes[0].x)
    assert all(i.isVisible() for i in win.panel.gt_boxes.items)


def test_left_drag_pans_or_levels_in_wl_mode(qtbot, win):
    win.state.set_study(make_study((256, 256)))
    l0, r0 = levels(win), win.panel.view.viewRect()
    right_drag(qtbot, win.panel, 40, 25, rb=Qt.MouseButton.LeftButton)
    r1 = win.panel.view.viewRect()
    assert levels(win) == pytest.approx(l0) and r1.center() != r0.center()  # panned
    assert r1.width() == pytest.approx(r0.width())  # not zoomed
    from PySide6.QtGui import QKeySequence

    qtbot.keySequence(win.panel, QKeySequence("Shift+W"))  # (W draws a box since issue 6)
    assert win.panel.wl_mode
    right_drag(qtbot, win.panel, 40, 25, rb=Qt.MouseButton.LeftButton)
    assert levels(win) != pytest.approx(l0, rel=1e-3)
    assert win.panel.view.viewRect() == r1
    # a tool (box editor) can claim drags before pan and W/L
    claimed = []
    win.panel.view.drag_interceptors.append(lambda ev: claimed.append(ev.button()) or True)
    l1 = levels(win)
    right_drag(qtbot, win.panel, 30, 30, rb=Qt.MouseButton.LeftButton)
    assert claimed and levels(win) == pytest.approx(l1) and win.panel.view.viewRect() == r1


def test_drop_files_opens_them(qtbot, win, fake_io):
    from PySide6.QtCore import QMimeData, QUrl
    from PySide6.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile("/fake/s0.png"), QUrl.fromLocalFile("/fake/s1.png")])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime,
                    Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        win.dropEvent(ev)
    assert len(win.state.worklist) == 2


def test_error_popup_is_non_modal(qtbot):
    w = MainWindow(popup_errors=True)
    qtbot.addWidget(w)
    w.show()
    w.report_error("broken.dcm: the file is empty (0 bytes)")
    assert w._error_box.isVisible() and w._error_box.windowModality() == Qt.WindowModality.NonModal
    assert "empty" in w.statusBar().currentMessage()
    w.close()
    assert not w._error_box.isVisible()


def test_run_gui_opens_and_returns(qtbot, monkeypatch, fake_io):
    from PySide6.QtCore import QTimer

    from cxrviewer.gui import app as gui_app

    seen = []

    def close_when_loaded():
        wins = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if wins and wins[-1].state.study is not None:
            seen.append(wins[-1].state.study.study_id)
            wins[-1].close()
        else:
            QTimer.singleShot(20, close_when_loaded)

    QTimer.singleShot(0, close_when_loaded)
    safety = QTimer()  # never hang CI; stopped below so it cannot quit later tests' loops
    safety.setSingleShot(True)
    safety.timeout.connect(QApplication.instance().quit)
    safety.start(20_000)
    try:
        assert gui_app.run_gui(["/fake/s0.png"], demo=False) == 0
    finally:
        safety.stop()
    assert seen == ["s0"]


def test_fast_paging_shows_only_the_last_study(qtbot, win, fake_io):
    shown = []
    win.state.studyChanged.connect(lambda s: shown.append(s.study_id if s is not None else None))
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        win.open_paths([str(i) for i in range(6)])
    for _ in range(5):
        qtbot.keyClick(win.panel, Qt.Key.Key_Right)  # no event processing in between
    qtbot.waitUntil(lambda: win.state.study is not None and win.state.study.study_id == "s5", timeout=5000)
    assert [s for s in shown if s is not None] == ["s0", "s5"]  # stale loads were dropped
    assert [win.study_list.status(i) for i in range(6)] == ["ok", "", "", "", "", "ok"]


def test_shortcuts_work_with_focus_in_study_list(qtbot, win, fake_io):
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        win.open_paths(["a", "b", "c"])
    win.study_list.setFocus()
    qtbot.keyClick(win.study_list, Qt.Key.Key_3)
    assert win.state.preset_name == "Lung"
    qtbot.keyClick(win.study_list, Qt.Key.Key_I)
    assert win.state.invert
    qtbot.keyClick(win.study_list, Qt.Key.Key_Space)
    assert not win.state.invert and win.state.preset_name == "Header default"
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        qtbot.keyClick(win.study_list, Qt.Key.Key_Down)
    assert win.state.current_index == 1
    with qtbot.waitSignal(win.state.studyChanged, timeout=5000, check_params_cb=lambda s: s is not None):
        qtbot.keyClick(win.study_list, Qt.Key.Key_Right)
    assert win.state.current_index == 2


def test_extension_panel_subclass_links_to_state(qtbot, win):
    """The way issue-5 panels plug in: subclass, title, bind to the shared state, link views."""
    from cxrviewer.gui.views.image_panel import ImagePanel

    class CamPanel(ImagePanel):
        def on_study_changed(self, study):
            if study is not None:
                self.heatmap.set_heatmap(np.ones((7, 7), np.float32) * np.arange(7))

    cam = CamPanel(title="Grad-CAM")
    qtbot.addWidget(cam)
    cam.bind(win.state)
    cam.link_view(win.panel)
    win.state.set_study(make_study((120, 100)))
    assert cam.heatmap.heatmap is not None and cam.heatmap.item.isVisible()
    assert cam.image_shape == (120, 100)
    win.state.apply_preset("2")
    assert cam.image_item.getLevels() == pytest.approx(win.panel.image_item.getLevels())
    cam.windowDragged.emit(40.0, 0.0)  # a drag in the linked panel re-levels the main one
    assert win.panel.image_item.getLevels() == pytest.approx(cam.image_item.getLevels())
    assert win.state.preset_name == ""
