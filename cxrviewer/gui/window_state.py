"""The main window reopens as the user left it (kept in the settings, saved on close).

Saved: the window's geometry and dock layout (``saveGeometry``/``saveState``), the panel
layout the user picked (none while the layout still follows the model set), the focus panel,
the colour map, the map opacity, the colour scale mode and the class the user chose (shown
again when the model set has it). A saved geometry that no longer fits a screen (a monitor
was unplugged, the resolution dropped) is ignored: the window starts at its default size,
fitted into the screen, as on a first start.
"""
from __future__ import annotations

import json

from PySide6.QtCore import QByteArray, QRect, Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QComboBox, QMainWindow

from .settings import app_settings

#: bump when the docks change so much that an old saveState should not be applied
STATE_VERSION = 1
KEYS = {"geometry": "window/geometry", "rect": "window/rect", "state": "window/state", "layout": "view/layout",
        "focus": "view/focus", "colormap": "view/colormap", "opacity": "view/opacity",
        "scale": "view/scale_mode", "class": "view/class"}


def fits_a_screen(rect: QRect) -> bool:
    """Whether ``rect`` (a window's geometry) lies on some screen: its centre inside the screen's
    available area and its size no larger than that area."""
    for screen in QGuiApplication.screens():
        avail = screen.availableGeometry()
        if avail.contains(rect.center()) and rect.width() <= avail.width() and rect.height() <= avail.height():
            return True
    return False


def save_window(win: QMainWindow) -> None:
    """Write geometry, dock state and the view choices of ``win`` (a MainWindow) to the settings."""
    s = app_settings()
    s.setValue(KEYS["geometry"], win.saveGeometry())
    g = win.normalGeometry() if win.isMaximized() or win.isFullScreen() else win.geometry()
    s.setValue(KEYS["rect"], json.dumps([g.x(), g.y(), g.width(), g.height()]))
    s.setValue(KEYS["state"], win.saveState(STATE_VERSION))
    s.setValue(KEYS["layout"], win.user_layout())
    s.setValue(KEYS["focus"], str(win.focus_combo.currentData() or ""))
    s.setValue(KEYS["colormap"], str(win.cmap_combo.currentData() or ""))
    s.setValue(KEYS["opacity"], int(win.opacity_slider.value()))
    s.setValue(KEYS["scale"], str(win.scale_combo.currentData() or ""))
    s.setValue(KEYS["class"], win.user_class())
    s.sync()


def saved_rect() -> QRect | None:
    """The window geometry saved last (None when none or unreadable)."""
    try:
        x, y, w, h = (int(v) for v in json.loads(str(app_settings().value(KEYS["rect"], "") or "null")))
    except (TypeError, ValueError):
        return None
    return QRect(x, y, w, h)


def _restore_geometry(win: QMainWindow, default_size: tuple[int, int]) -> bool:
    """Apply the saved dock state and geometry; False (the window keeps ``default_size``, which the
    first show fits into the screen) when the geometry is missing, unreadable or was saved where
    no screen is now (Qt would squeeze it in; the default layout is the better start)."""
    s = app_settings()
    geo, state = s.value(KEYS["geometry"]), s.value(KEYS["state"])
    if isinstance(state, QByteArray) and not state.isEmpty():
        win.restoreState(state, STATE_VERSION)
    rect = saved_rect()
    if not isinstance(geo, QByteArray) or geo.isEmpty() or rect is None or not fits_a_screen(rect):
        return False
    if win.restoreGeometry(geo) and fits_a_screen(win.geometry()):
        return True
    win.setWindowState(Qt.WindowState.WindowNoState)
    win.resize(*default_size)
    screen = QGuiApplication.primaryScreen()
    if screen is not None:
        win.move(screen.availableGeometry().topLeft())
    return False


def _select(combo: QComboBox, value: object) -> None:
    i = combo.findData(str(value or ""))
    if i >= 0:
        combo.setCurrentIndex(i)


def restore_window(win: QMainWindow, default_size: tuple[int, int]) -> bool:
    """Restore what :func:`save_window` wrote (before the first show); True when the saved
    geometry was applied."""
    placed = _restore_geometry(win, default_size)
    s = app_settings()
    layout = str(s.value(KEYS["layout"], "") or "")
    if layout and win.layout_combo.findData(layout) >= 0:
        win.set_layout(layout)
    _select(win.focus_combo, s.value(KEYS["focus"], ""))
    _select(win.cmap_combo, s.value(KEYS["colormap"], ""))
    _select(win.scale_combo, s.value(KEYS["scale"], ""))
    try:
        opacity = int(s.value(KEYS["opacity"], -1))
    except (TypeError, ValueError):
        opacity = -1
    if 0 <= opacity <= 100:
        win.opacity_slider.setValue(opacity)
    name = str(s.value(KEYS["class"], "") or "")
    if name:
        win.restore_class(name)
    return placed
