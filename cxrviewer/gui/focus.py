"""Focus returns to the viewer after a dialog closes.

Without this, closing a dialog (a message box, a file dialog, the class chooser) can leave
the keyboard focus on no widget or on a dock, so the viewer's keys do nothing until the
image is clicked. ``install_focus_return`` installs one application event filter that, when a
dialog belonging to the window hides, re-activates the window and focuses the viewer.
"""
from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtWidgets import QApplication, QDialog, QMainWindow, QWidget

_HIDE = QEvent.Type.Hide


class FocusReturn(QObject):
    """Application event filter: a hidden QDialog of ``window`` gives the focus back to ``target()``."""

    def __init__(self, window: QMainWindow, target: Callable[[], QWidget | None]) -> None:
        super().__init__(window)  # deleted with the window (and so removed from the application)
        self._window = window
        self._target = target

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        """Schedule :meth:`restore` when a dialog of the window hides; never consumes an event."""
        if event.type() == _HIDE and isinstance(obj, QDialog) and self._belongs(obj):
            QTimer.singleShot(0, self, self.restore)  # once the dialog is gone
        return False

    def _belongs(self, dialog: QDialog) -> bool:
        parent = dialog.parentWidget()
        return parent is not None and parent.window() is self._window

    def restore(self) -> None:
        """Activate the window and focus the target, unless another dialog or popup is still open."""
        win = self._window
        if not win.isVisible() or QApplication.activeModalWidget() is not None \
                or QApplication.activePopupWidget() is not None:
            return
        win.activateWindow()
        win.raise_()
        target = self._target()
        if target is not None and target.isVisible() and target.window() is win:
            target.setFocus(Qt.FocusReason.OtherFocusReason)


def install_focus_return(window: QMainWindow, target: Callable[[], QWidget | None]) -> QObject:
    """Give the keyboard focus back to ``target()`` (the viewer panel) whenever a dialog, message
    box or file dialog that belongs to ``window`` closes. Returns the installed filter (owned by
    ``window``)."""
    app = QApplication.instance()
    if app is None:
        raise RuntimeError("install_focus_return needs a QApplication")
    f = FocusReturn(window, target)
    app.installEventFilter(f)
    return f
