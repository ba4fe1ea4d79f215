"""A bundle's model card (its evaluation, ``manifest.json`` ``model_card``) in a read-only window."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QPlainTextEdit, QVBoxLayout, QWidget

from ...core.errors import CxrError
from ...core.model_card import card_lines

#: the first line of a bundle without a card
NO_CARD = "No model card"


def bundle_card_lines(path: str | Path) -> list[str]:
    """The card of the bundle at ``path`` as text lines (a 'No model card' line when it has none)."""
    from ...core.bundle import read_manifest

    try:
        manifest = read_manifest(path)
    except CxrError as exc:
        return [f"{NO_CARD}: the manifest cannot be read ({exc})."]
    return card_lines(manifest)


class ModelCardDialog(QDialog):
    """Monospace, selectable, scrollable text of one card; Copy puts it on the clipboard."""

    def __init__(self, name: str, lines: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Model card — {name}")
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.text.setPlainText("\n".join(lines))
        head = QLabel(f"<b>{name}</b> — evaluation recorded in the bundle's manifest "
                      "(research use: not a clinical validation)", self)
        head.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        copy = buttons.addButton("Copy", QDialogButtonBox.ButtonRole.ActionRole)
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.text.toPlainText()))
        buttons.rejected.connect(self.close)
        lay = QVBoxLayout(self)
        lay.addWidget(head)
        lay.addWidget(self.text, 1)
        lay.addWidget(buttons)
        self.resize(720, 460)

    @property
    def lines(self) -> list[str]:
        return self.text.toPlainText().split("\n")
