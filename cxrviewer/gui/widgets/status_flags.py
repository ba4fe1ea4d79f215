"""Status-bar fields: the alignment check (rejected: a red flag; accepted: quiet NCC) and
:class:`ElidedLabel` (a plain-text field that shortens with "…" instead of running into its
neighbour; full text in its tooltip)."""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget

from ...core.panels import alignment_note

#: style of a rejected alignment (stands out) and of an accepted one (quiet)
REJECTED_STYLE = ("QLabel { background: #b03a2e; color: white; font-weight: bold; padding: 1px 6px; "
                  "border-radius: 3px; }")
ACCEPTED_STYLE = "QLabel { color: #8a8a8a; padding: 1px 4px; }"


class AlignmentFlag(QLabel):
    """The alignment quality of the shown study's results (hidden when unchecked or no study)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rejected = False
        self.hide()

    def set_results(self, results: Any) -> None:
        """Show what ``results`` say about the alignment (None: clear)."""
        note = alignment_note(results)
        if note is None:
            self.clear_flag()
            return
        text, self.rejected = note
        self.setText(text)
        self.setStyleSheet(REJECTED_STYLE if self.rejected else ACCEPTED_STYLE)
        self.setMinimumWidth(self.sizeHint().width())  # never cut: other status widgets give way
        self.setToolTip("The alignment to the canonical chest scored below the threshold: the maps were "
                        "computed on the unaligned image and may be less reliable." if self.rejected else
                        "Normalised cross-correlation of the aligned image with the canonical chest")
        self.show()

    def clear_flag(self) -> None:
        self.rejected = False
        self.setText("")
        self.setToolTip("")
        self.hide()


class ElidedLabel(QLabel):
    """A one-line plain-text status field: at most its text's width, at least ``min_width``;
    when narrower than its text it draws the text elided and keeps the full text in the tooltip."""

    def __init__(self, text: str = "", parent: QWidget | None = None, *, min_width: int = 40,
                 auto_tip: bool = True) -> None:
        self._auto_tip = auto_tip  # False: the owner sets its own tooltip
        super().__init__(text, parent)
        self._min = int(min_width)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        if auto_tip:
            self.setToolTip(text)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        super().setText(text)
        if self._auto_tip:
            self.setToolTip(text)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        return QSize(self._min, super().minimumSizeHint().height())

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt naming
        p = QPainter(self)
        rect = self.contentsRect()
        text = self.fontMetrics().elidedText(self.text(), Qt.TextElideMode.ElideRight, rect.width())
        p.setPen(self.palette().windowText().color())
        p.drawText(rect, int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft), text)
        p.end()
