"""A read-only message log (load errors, warnings) shown in a dock.

Errors never open a modal dialog by default: they go to the status bar and
here. :func:`install_log_handler` also routes Python ``logging`` records of
level WARNING and above from the ``cxrviewer`` loggers into the panel.
"""
from __future__ import annotations

import html
import logging
import time

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QPlainTextEdit, QWidget


class LogPanel(QPlainTextEdit):
    """Append-only message list with time stamps."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(2000)
        self.messages: list[tuple[str, str]] = []  # (level, text), for tests and export

    def add(self, text: str, level: str = "info") -> None:
        self.messages.append((level, text))
        colour = {"error": "#d33", "warning": "#c80"}.get(level, "")
        stamp = time.strftime("%H:%M:%S")
        body = html.escape(text)
        if colour:
            body = f'<span style="color:{colour}">{body}</span>'
        self.appendHtml(f"{stamp} {body}")


class _Bridge(QObject):
    message = Signal(str, str)


class QtLogHandler(logging.Handler):
    """A logging handler that forwards records to a LogPanel (thread-safe via a signal)."""

    def __init__(self, panel: LogPanel, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._bridge = _Bridge()
        self._bridge.message.connect(panel.add)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            self._bridge.message.emit(self.format(record), level)
        except RuntimeError:  # panel already deleted
            pass
