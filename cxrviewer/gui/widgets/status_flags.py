"""Status-bar flags of the shown study: the alignment check (rejected: a red flag; accepted: quiet NCC)."""
from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QLabel, QWidget

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
