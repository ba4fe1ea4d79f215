"""User messages of the annotation tools: the log, a ``message`` signal and the status bar."""
from __future__ import annotations

import logging

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QStatusBar

from ..core.annotations import EditRefused

log = logging.getLogger(__name__)


class AnnotationFeedback(QObject):
    """Says what happened: ``info`` (5 s), ``error`` (10 s) or a refused edit's message.

    ``status_bar``: where messages are shown besides the log and ``message`` (optional).
    """

    message = Signal(str)

    def __init__(self, status_bar: QStatusBar | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.status_bar = status_bar

    def info(self, text: str, timeout: int = 5000) -> None:
        log.info("%s", text)
        self._show(text, timeout)

    def error(self, text: str) -> None:
        log.warning("%s", text)
        self._show(text, 10000)

    def refused(self, exc: EditRefused) -> None:
        """An edit that was not attempted (``quiet`` ones were reported already)."""
        if exc.level == "error":
            self.error(str(exc))
        elif exc.level != "quiet":
            self.info(str(exc))

    def _show(self, text: str, timeout: int) -> None:
        self.message.emit(text)
        if self.status_bar is not None:
            self.status_bar.showMessage(text, timeout)
