"""Focus returns to the viewer after a dialog of the window closes (issue 14)."""
from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QDialog, QLineEdit, QMainWindow, QMessageBox, QVBoxLayout, QWidget

from cxrviewer.gui.focus import install_focus_return


class Window(QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        self.viewer = QWidget()
        self.viewer.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setCentralWidget(self.viewer)
        self.resize(400, 300)


@pytest.fixture
def win(qtbot):
    w = Window()
    qtbot.addWidget(w)
    install_focus_return(w, lambda: w.viewer)
    w.show()
    qtbot.waitExposed(w)
    w.activateWindow()
    return w


def _dialog(parent: QWidget) -> tuple[QDialog, QLineEdit]:
    dlg = QDialog(parent)
    edit = QLineEdit(dlg)
    QVBoxLayout(dlg).addWidget(edit)
    return dlg, edit


def test_focus_back_on_the_viewer_after_a_dialog(qtbot, win):
    dlg, edit = _dialog(win)
    dlg.open()
    qtbot.waitExposed(dlg)
    edit.setFocus()
    qtbot.waitUntil(edit.hasFocus, timeout=2000)
    assert not win.viewer.hasFocus()
    dlg.accept()
    qtbot.waitUntil(win.viewer.hasFocus, timeout=2000)
    assert QApplication.focusWidget() is win.viewer


def test_after_a_message_box_from_a_child_widget(qtbot, win):
    box = QMessageBox(QMessageBox.Icon.Question, "Create a project?", "No project is open.",
                      QMessageBox.StandardButton.Ok | QMessageBox.StandardButton.Cancel, win.viewer)
    box.open()
    qtbot.waitExposed(box)
    qtbot.waitUntil(lambda: not win.viewer.hasFocus(), timeout=2000)
    box.done(QMessageBox.StandardButton.Cancel)
    qtbot.waitUntil(win.viewer.hasFocus, timeout=2000)


def test_closing_an_inner_dialog_keeps_focus_in_the_outer_one(qtbot, win):
    outer, outer_edit = _dialog(win)
    outer.open()
    qtbot.waitExposed(outer)
    inner, _ = _dialog(outer)
    inner.open()
    qtbot.waitExposed(inner)
    inner.reject()
    qtbot.wait(50)
    assert not win.viewer.hasFocus()
    outer.reject()
    qtbot.waitUntil(win.viewer.hasFocus, timeout=2000)


def test_a_dialog_of_another_window_is_left_alone(qtbot, win):
    other = QWidget()
    qtbot.addWidget(other)
    other_edit = QLineEdit(other)
    other.show()
    qtbot.waitExposed(other)
    dlg, _ = _dialog(other)
    dlg.open()
    qtbot.waitExposed(dlg)
    dlg.reject()
    other.activateWindow()
    other_edit.setFocus()
    qtbot.wait(50)
    assert not win.viewer.hasFocus()


def test_target_none_is_harmless(qtbot):
    w = Window()
    qtbot.addWidget(w)
    install_focus_return(w, lambda: None)
    w.show()
    qtbot.waitExposed(w)
    dlg, _ = _dialog(w)
    dlg.open()
    dlg.reject()
    qtbot.wait(20)
    assert w.isVisible()


def test_main_window_viewer_gets_the_keys_back(qtbot):
    """MainWindow installs ``install_focus_return(self, lambda: self.grid.active)`` itself."""
    from cxrviewer.gui.main_window import MainWindow

    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    box = QMessageBox(QMessageBox.Icon.Information, "Export", "Wrote panels.png", QMessageBox.StandardButton.Ok, w)
    box.open()
    qtbot.waitExposed(box)
    box.done(QMessageBox.StandardButton.Ok)
    qtbot.waitUntil(w.grid.active.hasFocus, timeout=2000)
