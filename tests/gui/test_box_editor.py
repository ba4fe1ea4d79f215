"""The box editor driven by real mouse drags and keys (offscreen Qt).

The host is a small QMainWindow exposing ``panel`` + ``state`` (what the
controller needs), so these tests do not depend on the main window's layout.
After each step the store (the SQLite file) must match what the editor shows.
"""
from __future__ import annotations

import pyqtgraph as pg
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QMainWindow

from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.geometry import Box
from cxrviewer.gui.annotation_actions import SHORTCUTS, shortcuts_markdown
from cxrviewer.gui.annotation_controller import AnnotationController
from cxrviewer.gui.shortcuts import ShortcutRegistry, ShortcutsDialog
from cxrviewer.gui.state import ViewerState
from cxrviewer.gui.views.box_editor import EditorItem, hit_test, move_rect, resize_rect, span_rect
from cxrviewer.gui.views.image_panel import ImagePanel
from tests.core.test_annotation_session import H, W, make_study  # noqa: F401 - also used from here

pg.setConfigOption("mouseRateLimit", 0)

TOL = 2.5  # image px: the view maps ~1 screen px to ~1.3 image px here


class Host(QMainWindow):
    """The least a window must expose for the controller: ``panel`` and ``state``."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ViewerState(self)
        self.panel = ImagePanel(self)
        self.panel.bind(self.state)
        self.setCentralWidget(self.panel)
        self.statusBar().showMessage("ready")  # (created lazily it would resize the panel)
        f = self.menuBar().addMenu("&File")
        f.addAction("&Quit", self.close)
        self.menuBar().addMenu("&Help")
        # a viewer action that shares Space with "mark done" (like the main window's reset)
        self.resets = 0
        act = f.addAction("&Reset view")
        act.setShortcut("Space")
        act.triggered.connect(self._reset)
        self.addAction(act)
        self.resize(760, 640)

    def _reset(self) -> None:
        self.resets += 1


@pytest.fixture
def host(qtbot):
    w = Host()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is w, timeout=5000)  # window shortcuts
    yield w
    w.close()


@pytest.fixture
def ctrl(host, tmp_path):
    c = AnnotationController.attach(host, annotator="tester")
    assert c.open_store(tmp_path / "project.cxrann")
    host.state.set_study(make_study())
    c.set_annotation_mode(True)
    return c


# ---- mouse helpers ----------------------------------------------------------------------
def to_viewport(panel: ImagePanel, x: float, y: float) -> QPoint:
    return panel.mapFromScene(panel.view.mapViewToScene(QPointF(x, y)))


def drag(panel: ImagePanel, p0: tuple[float, float], p1: tuple[float, float], steps: int = 6) -> None:
    """A real left drag on the viewport, from image point p0 to p1."""
    vp = panel.viewport()
    a, b = to_viewport(panel, *p0), to_viewport(panel, *p1)
    QTest.mousePress(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, a)
    for i in range(1, steps + 1):
        QTest.mouseMove(vp, QPoint(a.x() + (b.x() - a.x()) * i // steps,
                                   a.y() + (b.y() - a.y()) * i // steps))
    QTest.mouseRelease(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, b)


def click(panel: ImagePanel, p: tuple[float, float]) -> None:
    QTest.mouseClick(panel.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     to_viewport(panel, *p))


def stored(ctrl: AnnotationController) -> list[tuple]:
    return [(b.id, b.label, b.x, b.y, b.w, b.h) for b in ctrl.store.boxes(ctrl.record.id)]


def shown(ctrl: AnnotationController) -> list[tuple]:
    return [(it.id, it.label, it.x, it.y, it.w, it.h) for it in ctrl.editor.items if it.kind == "box"]


def assert_in_sync(ctrl: AnnotationController) -> list[tuple]:
    """The editor and the dock show the store (after the redraw a gesture leaves for the next
    event-loop turns)."""
    ctrl.edits.flush_view()
    s = stored(ctrl)
    assert s == shown(ctrl)
    assert ctrl.dock.box_list.topLevelItemCount() == len(ctrl.editor.items)
    return s


def approx_box(row: tuple, x: float, y: float, w: float, h: float) -> None:
    assert row[2:] == pytest.approx((x, y, w, h), abs=TOL)


# ---- pure geometry ------------------------------------------------------------------------
def test_geometry_helpers_clamp_and_normalise():
    assert span_rect(450, 350, 600, 420, W, H) == (450, 350, 50, 50)  # clamped to the image
    assert span_rect(100, 100, 40, 20, W, H) == (40, 20, 60, 80)  # dragged up-left
    assert move_rect((10, 10, 50, 40), -30, 500, W, H) == (0, H - 40, 50, 40)  # size kept
    assert resize_rect((10, 10, 50, 40), "se", 1000, 5, W, H) == (10, 10, W - 10, 45)
    assert resize_rect((10, 10, 50, 40), "w", 80, 0, W, H) == (60, 10, 30, 40)  # past the edge
    it = EditorItem("box", 1, "Mass", 100, 100, 50, 50)
    small = EditorItem("box", 2, "Mass", 110, 110, 10, 10)
    assert hit_test([it], 100, 100, 3) == (("box", 1), "nw")
    assert hit_test([it], 150, 125, 3) == (("box", 1), "e")
    assert hit_test([it], 125, 125, 3) == (("box", 1), "inside")
    assert hit_test([it], 10, 10, 3) is None
    assert hit_test([it, small], 115, 115, 3) == (("box", 2), "inside")  # smallest wins


# ---- the acceptance sequence -----------------------------------------------------------------
def test_draw_move_resize_delete_undo_redo_with_real_drags(qtbot, host, ctrl, tmp_path):
    panel, store = host.panel, ctrl.store
    n_edits = len(store.edit_ids())

    # draw: W arms a one-shot draw mode, then a left drag draws the box
    qtbot.keyClick(panel, Qt.Key.Key_W)
    assert ctrl.editor.draw_mode
    drag(panel, (50, 60), (150, 140))
    assert not ctrl.editor.draw_mode
    s1 = assert_in_sync(ctrl)
    assert len(s1) == 1
    approx_box(s1[0], 50, 60, 100, 80)
    assert len(store.edit_ids()) == n_edits + 1  # ONE edit for the whole drag
    assert ctrl.store.labels(ctrl.record.id) == {"Atelectasis": "present"}
    assert ctrl.record.status == "in_progress"
    box_id = s1[0][0]
    assert ctrl.editor.selected == [("box", box_id)]

    # move: drag from inside the box
    x, y, w, h = s1[0][2:]
    drag(panel, (x + w / 2, y + h / 2), (x + w / 2 + 40, y + h / 2 + 30))
    s2 = assert_in_sync(ctrl)
    approx_box(s2[0], x + 40, y + 30, w, h)
    assert s2[0][4:] == (w, h)  # a move keeps the size exactly
    assert len(store.edit_ids()) == n_edits + 2

    # resize: drag the bottom-right corner handle
    x, y, w, h = s2[0][2:]
    drag(panel, (x + w, y + h), (x + w + 30, y + h + 20))
    s3 = assert_in_sync(ctrl)
    approx_box(s3[0], x, y, w + 30, h + 20)
    assert s3[0][2:4] == (x, y)  # the opposite corner stays put
    assert len(store.edit_ids()) == n_edits + 3

    # a drag off any box pans, it does not edit
    r0 = panel.view.viewRect()
    drag(panel, (400, 350), (380, 330))
    assert panel.view.viewRect() != r0 and stored(ctrl) == s3

    # delete with the Del key (the box is selected)
    click(panel, (s3[0][2] + 5, s3[0][3] + 5))
    assert ctrl.editor.selected == [("box", box_id)]
    qtbot.keyClick(panel, Qt.Key.Key_Delete)
    s4 = assert_in_sync(ctrl)
    assert s4 == []

    # undo all (Ctrl+Z), checking every intermediate state, then redo all (Ctrl+Shift+Z / Ctrl+Y)
    history = [[], s1, s2, s3, s4]
    for expected in reversed(history[:-1]):
        qtbot.keyClick(panel, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
        assert assert_in_sync(ctrl) == expected
    assert not ctrl.session.undo_stack.can_undo
    for i, expected in enumerate(history[1:]):
        if i % 2:
            qtbot.keyClick(panel, Qt.Key.Key_Y, Qt.KeyboardModifier.ControlModifier)
        else:
            QTest.keySequence(panel, QKeySequence("Ctrl+Shift+Z"))
        assert assert_in_sync(ctrl) == expected
    qtbot.keyClick(panel, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    final = assert_in_sync(ctrl)
    assert final == s3

    # a reopened store shows the same boxes
    path, sid = store.path, ctrl.record.id
    ctrl.close_store()
    with AnnotationStore(path, read_only=True) as again:
        assert [(b.id, b.label, b.x, b.y, b.w, b.h) for b in again.boxes(sid)] == final
        assert again.integrity_check() == "ok"
    assert ctrl.open_store(path)
    assert assert_in_sync(ctrl) == final


def test_clamped_and_zero_area_boxes(qtbot, host, ctrl):
    panel = host.panel
    messages = []
    ctrl.message.connect(messages.append)
    ctrl.toggle_draw()
    drag(panel, (440, 340), (W + 40, H + 30))  # ends outside the image
    s = assert_in_sync(ctrl)
    assert len(s) == 1
    assert s[0][2] + s[0][4] == pytest.approx(W) and s[0][3] + s[0][5] == pytest.approx(H)
    ctrl.toggle_draw()
    drag(panel, (100, 100), (200, 100))  # no height
    assert len(assert_in_sync(ctrl)) == 1
    assert any("empty" in m for m in messages)
    # moving a box against the border stops there, the size is kept
    x, y, w, h = s[0][2:]
    drag(panel, (x + w / 2, y + h / 2), (x + w / 2 + 50, y + h / 2 + 50))
    assert stored(ctrl)[0][2:] == pytest.approx((x, y, w, h))
    # the store refuses a zero-area box from code paths too
    ctrl.add_box("Mass", 10, 10, 0, 20)
    assert len(stored(ctrl)) == 1


def test_an_edit_restyles_the_shown_boxes_in_place(qtbot, host, ctrl):
    """A move or a selection change keeps the box's graphics items (building a label costs ~1 ms:
    benchmarks/box_editor_stall.py); what is drawn still follows the store."""
    panel = host.panel
    ctrl.add_box("Mass", 50, 50, 150, 100)
    ctrl.add_box("Nodule", 350, 250, 80, 80)
    first, second = [("box", b.id) for b in ctrl.store.boxes(ctrl.record.id)]
    outline, label = ctrl.editor.outline(first), ctrl.editor._drawn[first].text
    ctrl.editor.select([first])
    assert ctrl.editor.outline(first) is outline and len(ctrl.editor._drawn[first].handles) == 8
    drag(panel, (125, 100), (165, 130))
    s = assert_in_sync(ctrl)
    assert s[0][2:4] == pytest.approx((90, 80), abs=3)
    assert ctrl.editor.outline(first) is outline and ctrl.editor._drawn[first].text is label
    assert outline.rect().x() == pytest.approx(s[0][2]) and outline.pen().width() == 3  # selected
    ctrl.editor.select([second])
    assert ctrl.editor.outline(first) is outline and outline.pen().width() == 2
    assert all(h.opacity() == 0 for h in ctrl.editor._drawn[first].handles)
    assert [h.opacity() for h in ctrl.editor._drawn[second].handles] == [1.0] * 8
    ctrl.edits.set_class("Effusion")  # relabels the selected box: a new caption
    assert ctrl.editor._drawn[second].text.toPlainText().startswith("Effusion")
    assert stored(ctrl)[1][1] == "Effusion"


def test_a_gesture_commits_at_release_and_redraws_on_the_next_turn(qtbot, host, ctrl):
    """The release handler only commits (benchmarks/box_editor_stall.py: no handler holds the GUI
    for the commit, the redraw and a repaint together); the drawn preview becomes the stored box's
    graphics on the next event-loop turn; an undo before that turn undoes the gesture's edit."""
    panel = host.panel
    qtbot.keyClick(panel, Qt.Key.Key_W)
    drag(panel, (50, 60), (150, 140))
    preview = ctrl.editor._preview
    assert preview is not None and len(stored(ctrl)) == 1  # on disk at release, not yet redrawn
    assert shown(ctrl) == []
    qtbot.waitUntil(lambda: shown(ctrl) != [], timeout=2000)
    s = assert_in_sync(ctrl)
    key = ("box", s[0][0])
    assert ctrl.editor._preview is None and ctrl.editor.outline(key) is preview.rect  # adopted, not rebuilt
    assert ctrl.editor.selected == [key] and preview.text.toPlainText().startswith(s[0][1])
    # move, then undo before the redraw: the move is undone, the box is where it was drawn
    drag(panel, (100, 100), (140, 130))
    assert stored(ctrl)[0][2:4] == pytest.approx((s[0][2] + 40, s[0][3] + 30), abs=3)
    ctrl.edits.undo()
    assert assert_in_sync(ctrl) == s


def test_class_copy_paste_duplicate_carry(qtbot, host, ctrl):
    panel = host.panel
    ctrl.edits.set_class("Nodule")
    ctrl.toggle_draw()
    drag(panel, (60, 60), (120, 140))
    (bid, label, *_), = assert_in_sync(ctrl)
    assert label == "Nodule"
    qtbot.keyClick(panel, Qt.Key.Key_BracketRight)  # next class, applied to the selection
    assert stored(ctrl)[0][1] == "Pneumonia" and ctrl.editor.draw_label == "Pneumonia"
    qtbot.keyClick(panel, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(panel, Qt.Key.Key_V, Qt.KeyboardModifier.ControlModifier)
    s = assert_in_sync(ctrl)
    assert len(s) == 2 and s[1][2:] == s[0][2:]
    qtbot.keyClick(panel, Qt.Key.Key_D, Qt.KeyboardModifier.ControlModifier)
    s = assert_in_sync(ctrl)
    assert len(s) == 3 and s[2][2] == pytest.approx(s[1][2] + 10)
    n = len(ctrl.session.undo_stack)
    # carry to the next study (twice as large): scaled, one undo step, not duplicated
    host.state.set_study(make_study((2 * H, 2 * W), seed=1, name="s1"))
    assert stored(ctrl) == []
    qtbot.keyClick(panel, Qt.Key.Key_P, Qt.KeyboardModifier.ControlModifier)
    carried = assert_in_sync(ctrl)
    assert len(carried) == 3 and carried[0][2:] == pytest.approx(tuple(2 * v for v in s[0][2:]))
    assert len(ctrl.session.undo_stack) == n + 1
    ctrl.clipboard.carry_previous()
    assert len(stored(ctrl)) == 3


def test_proposals_dashed_accept_reject_keep_provenance(qtbot, host, ctrl):
    panel = host.panel
    n = ctrl.edits.add_model_proposals({"cia": [Box("Mass", 50, 50, 80, 60, 0.9),
                                          Box("Nodule", 300, 200, 40, 40, 0.4)]}, "tinycia")
    assert n == 2
    assert ctrl.edits.add_model_proposals({"cia": [Box("Mass", 50, 50, 80, 60, 0.9)]}, "tinycia") == 0
    # only the current class's proposals are shown (issue 14); Y with none shown accepts nothing
    assert ctrl.editor.draw_label == "Atelectasis" and ctrl.editor.items == []
    qtbot.keyClick(panel, Qt.Key.Key_Y)
    assert stored(ctrl) == [] and len(ctrl.store.proposals(ctrl.record.id, "pending")) == 2
    ctrl.edits.set_class("Mass")
    assert [it.label for it in ctrl.editor.items] == ["Mass"]
    QTest.keySequence(panel, QKeySequence("Shift+C"))  # every class's proposals
    props = [it for it in ctrl.editor.items if it.kind == "proposal"]
    assert len(props) == 2 and ctrl.actions.actions["annot.all_classes"].isChecked()
    drawn = ctrl.editor.outline(props[0].key)
    assert drawn.pen().style() == Qt.PenStyle.DashLine
    assert stored(ctrl) == []
    # Y accepts the first proposal; it becomes a box with the model's provenance
    qtbot.keyClick(panel, Qt.Key.Key_Y)
    (bid, label, *_), = stored(ctrl)
    b = ctrl.store.box(bid)
    assert (b.label, b.source, b.model_name, b.score) == ("Mass", "model", "tinycia:cia", 0.9)
    # moving the accepted box keeps its provenance
    drag(panel, (90, 80), (130, 110))
    b2 = ctrl.store.box(bid)
    assert b2.x == pytest.approx(b.x + 40, abs=TOL) and (b2.source, b2.model_name) == ("model", "tinycia:cia")
    # X rejects the remaining proposal
    qtbot.keyClick(panel, Qt.Key.Key_X)
    assert [it for it in ctrl.editor.items if it.kind == "proposal"] == []
    assert [p.status for p in ctrl.store.proposals(ctrl.record.id)] == ["accepted", "rejected"]
    # dragging a pending proposal accepts it with the new geometry in one undo step
    ctrl.edits.add_model_proposals([Box("Effusion", 300, 250, 60, 60, 0.7)], "other")
    n_undo = len(ctrl.session.undo_stack)
    drag(panel, (330, 280), (280, 240))
    boxes = ctrl.store.boxes(ctrl.record.id)
    assert len(boxes) == 2 and boxes[1].source == "model" and boxes[1].x == pytest.approx(250, abs=TOL)
    assert len(ctrl.session.undo_stack) == n_undo + 1
    ctrl.edits.undo()
    assert len(ctrl.store.boxes(ctrl.record.id)) == 1
    assert [it.kind for it in ctrl.editor.items].count("proposal") == 1


def test_space_marks_done_only_in_annotation_mode_and_d_a_step(qtbot, host, ctrl):
    panel = host.panel
    qtbot.keyClick(panel, Qt.Key.Key_Space)
    assert ctrl.record.status == "done" and host.resets == 0
    qtbot.keyClick(panel, Qt.Key.Key_Space)
    assert ctrl.record.status == "in_progress"
    qtbot.keyClick(panel, Qt.Key.Key_E)  # leave annotation mode: Space resets the view again
    assert not ctrl.annotation_mode
    qtbot.keyClick(panel, Qt.Key.Key_Space)
    assert host.resets == 1 and ctrl.record.status == "in_progress"
    # editing is off outside annotation mode: a drag on a box pans
    qtbot.keyClick(panel, Qt.Key.Key_E)
    ctrl.toggle_draw()
    drag(panel, (60, 60), (160, 160))
    qtbot.keyClick(panel, Qt.Key.Key_E)
    before = stored(ctrl)
    drag(panel, (110, 110), (150, 150))
    assert stored(ctrl) == before
    # D / A step through the worklist in annotation mode
    from pathlib import Path

    from cxrviewer.core.io.worklist import StudyRef, Worklist

    refs = [StudyRef(path=Path(f"/fake/s{i}.png"), key=f"s{i}", display_name=f"s{i}") for i in range(3)]
    host.state.set_worklist(Worklist(refs=refs, source="fake"))
    host.state.set_current_index(0)
    qtbot.keyClick(panel, Qt.Key.Key_E)
    qtbot.keyClick(panel, Qt.Key.Key_D)
    assert host.state.current_index == 1
    qtbot.keyClick(panel, Qt.Key.Key_A)
    assert host.state.current_index == 0


def test_labels_status_and_dock(qtbot, host, ctrl):
    combo = ctrl.dock.label_combos["Effusion"]
    combo.setCurrentIndex(3)  # uncertain
    assert ctrl.store.labels(ctrl.record.id) == {"Effusion": "uncertain"}
    combo.setCurrentIndex(0)
    assert ctrl.store.labels(ctrl.record.id) == {}
    ctrl.edits.set_status("verified")
    assert ctrl.store.study(ctrl.record.id).status == "verified"
    qtbot.waitUntil(lambda: ctrl.dock.status_combo.currentData() == "verified", timeout=2000)
    ctrl.edits.undo()
    assert ctrl.store.study(ctrl.record.id).status == "in_progress"


def test_shortcut_registry_rebind_persist_conflicts_and_help(qtbot, host, ctrl):
    reg = ctrl.registry
    ids = {e.id for e in reg.entries()}
    assert {s[0] for s in SHORTCUTS} <= ids
    assert any(i.startswith("window.") for i in ids)  # the host's own Space action was adopted
    with pytest.raises(ValueError):
        reg.set_keys("annot.draw", ["Ctrl+Z"])  # used by undo
    reg.set_keys("annot.draw", ["Q"])
    qtbot.keyClick(host.panel, Qt.Key.Key_Q)
    assert ctrl.editor.draw_mode
    ctrl.editor.cancel()
    qtbot.keyClick(host.panel, Qt.Key.Key_W)  # no longer bound
    assert not ctrl.editor.draw_mode
    fresh = ShortcutRegistry(None)
    from PySide6.QtGui import QAction

    fresh.register("annot.draw", QAction("Draw"), ["W", "N"])
    assert fresh.keys("annot.draw") == ["Q"]  # persisted in the settings
    reg.reset("annot.draw")
    assert reg.keys("annot.draw") == ["W", "N"]
    html = reg.help_html()
    for _sid, _text, _keys, _mode, desc in SHORTCUTS:
        assert desc.split(" (")[0][:20] in html
    dlg = ctrl.show_shortcuts()
    assert isinstance(dlg, ShortcutsDialog) and not dlg.isModal()
    assert dlg.table.rowCount() == len(reg.entries())
    assert not dlg.bind("annot.delete", "Space")  # mark done: conflict shown, nothing changed
    assert "already used" in dlg.message.text() and reg.keys("annot.delete") == ["Del"]
    assert dlg.bind("annot.delete", "K") and reg.keys("annot.delete") == ["K"]
    reg.reset()
    md = shortcuts_markdown(reg)
    assert "| W / N |" in md and "Ctrl+Z" in md


def test_exports_imports_and_second_instance(qtbot, host, ctrl, tmp_path):
    ctrl.add_box("Mass", 10, 20, 30, 40)
    ctrl.add_box("Nodule", 100, 120, 12, 14)
    before = stored(ctrl)
    for fmt, name in (("coco", "a.json"), ("nih-csv", "a.csv"), ("voc", "voc.zip"), ("yolo", "yolo")):
        out = ctrl.io.export_to(fmt, tmp_path / name)
        assert out is not None and out.exists()
    # import the COCO export into a fresh project: same boxes once the study is opened
    assert ctrl.open_store(tmp_path / "other.cxrann")
    edit = ctrl.io.import_from("coco", tmp_path / "a.json")
    assert edit is not None and len(edit.box_ids) == 2
    assert [r[1:] for r in stored(ctrl)] == [r[1:] for r in before]
    ctrl.edits.undo()  # an import is one undo step
    assert stored(ctrl) == []
    # a second window on the same project gets a clear notice, and sees the first one's edits
    host2 = Host()
    qtbot.addWidget(host2)
    c2 = AnnotationController.attach(host2, annotator="second")
    assert c2.open_store(tmp_path / "other.cxrann")
    notice = c2.session.notice
    assert notice and "another cxrviewer" in notice and c2.dock.notice_label.isVisibleTo(c2.dock)
    host2.state.set_study(make_study())
    ctrl.add_box("Mass", 10, 20, 30, 40)
    c2.poll_store()
    assert [r[1:] for r in stored(c2)] == [r[1:] for r in stored(ctrl)]
    c2.shutdown()
    # read-only: shown, not editable
    assert c2.open_store(tmp_path / "other.cxrann", read_only=True)
    assert "read-only" in (c2.session.notice or "")
    c2.set_annotation_mode(True)
    assert not c2.editor.enabled and c2.add_box("Mass", 1, 1, 5, 5) is None
    c2.shutdown()


def test_main_window_has_the_editor(qtbot, tmp_path):
    """The real main window: controller attached, menus, W draws, Shift+W toggles W/L mode."""
    from cxrviewer.gui.main_window import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    win.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is win, timeout=5000)  # window shortcuts
    ctrl = win.annotations
    assert isinstance(ctrl, AnnotationController)
    titles = [a.text().replace("&", "") for a in win.menuBar().actions()]
    assert "Annotate" in titles
    file_menu = next(a.menu() for a in win.menuBar().actions() if a.text().replace("&", "") == "File")
    assert any("Export annotations" in a.text().replace("&", "") for a in file_menu.actions())
    assert ctrl.open_store(tmp_path / "win.cxrann")
    win.state.set_study(make_study())
    QTest.keySequence(win.panel, QKeySequence("Shift+W"))
    assert win.panel.wl_mode
    QTest.keySequence(win.panel, QKeySequence("Shift+W"))
    qtbot.keyClick(win.panel, Qt.Key.Key_W)
    assert ctrl.annotation_mode and ctrl.editor.draw_mode and not win.panel.wl_mode
    drag(win.panel, (60, 60), (160, 130))
    rows = assert_in_sync(ctrl)
    assert len(rows) == 1
    approx_box(rows[0], 60, 60, 100, 70)
    # pipeline results of this study become dashed proposals (annotation mode)
    from types import SimpleNamespace

    res = SimpleNamespace(boxes={"cia": [Box(ctrl.editor.draw_label, 200, 150, 60, 50, 0.8)]},
                          study_id=win.state.study.study_id)  # (the current class: shown by default)
    ctrl.on_results("sha", res, "computed")  # (the window connects it to win.inference.finished)
    assert [it.kind for it in ctrl.editor.items] == ["box", "proposal"]
    # a finished fine-tune only offers its bundle; "Use the new model" makes its folder the active set
    new = tmp_path / "finetuned" / "ft.cxrbundle"
    new.mkdir(parents=True)
    before = win.model_picker.folder
    ctrl.bundleReady.emit(str(new))
    assert win.model_picker.folder == before
    ctrl.finetune.switchRequested.emit(str(new))
    assert win.model_picker.folder == str(new.parent)
    win.close()
    assert ctrl.store is None  # closed with the window (every edit was already committed)
