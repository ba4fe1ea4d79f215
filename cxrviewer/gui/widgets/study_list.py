"""The worklist as a three-column list: name, labels, status.

Follows a :class:`~cxrviewer.gui.state.ViewerState`: selecting a row sets the
state's current index, and the state's index changes select the row. Later
columns (model status, annotation counts) are set with :meth:`set_status`
or by adding columns to :attr:`COLUMNS`.
"""
from __future__ import annotations

from PySide6.QtCore import QSignalBlocker, Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

from ...core.io.worklist import StudyRef
from ..state import ViewerState

COL_NAME, COL_LABELS, COL_STATUS = 0, 1, 2
COLUMNS = ("Study", "Labels", "Status")


def labels_text(ref: StudyRef) -> str:
    """Positive labels joined by ', '; 'No Finding' for a labelled normal; '' if unknown."""
    if ref.labels is None:
        return ""
    pos = [k for k, v in ref.labels.items() if v]
    return ", ".join(pos) if pos else "No Finding"


class StudyList(QTreeWidget):
    """List of studies of the current worklist."""

    def __init__(self, state: ViewerState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.setColumnCount(len(COLUMNS))
        self.setHeaderLabels(list(COLUMNS))
        self.setRootIsDecorated(False)
        self.setUniformRowHeights(True)
        self.setAlternatingRowColors(True)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        header = self.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(COL_LABELS, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(COL_STATUS, QHeaderView.ResizeMode.ResizeToContents)
        self.setColumnWidth(COL_NAME, 130)
        self.currentItemChanged.connect(self._on_current_item_changed)
        state.worklistChanged.connect(self.reload)
        state.currentIndexChanged.connect(self.select_row)

    def reload(self) -> None:
        """Rebuild the rows from ``state.worklist``."""
        with QSignalBlocker(self):
            self.clear()
            for ref in self.state.worklist:
                item = QTreeWidgetItem([ref.display_name, labels_text(ref), ""])
                item.setToolTip(COL_NAME, str(ref.path))
                item.setToolTip(COL_LABELS, labels_text(ref))
                self.addTopLevelItem(item)

    def select_row(self, row: int) -> None:
        """Select ``row`` without feeding the change back to the state."""
        item = self.topLevelItem(row) if row >= 0 else None
        with QSignalBlocker(self):
            self.setCurrentItem(item)
        if item is not None:
            self.scrollToItem(item)

    def set_status(self, row: int, text: str, *, error: bool = False) -> None:
        item = self.topLevelItem(row)
        if item is None:
            return
        item.setText(COL_STATUS, text)
        item.setForeground(COL_STATUS, QBrush(QColor("#d33") if error else self.palette().text()))

    def status(self, row: int) -> str:
        item = self.topLevelItem(row)
        return item.text(COL_STATUS) if item is not None else ""

    def _on_current_item_changed(self, current: QTreeWidgetItem | None, _prev) -> None:
        if current is not None:
            self.state.set_current_index(self.indexOfTopLevelItem(current))

    def keyPressEvent(self, event) -> None:  # noqa: N802 - Qt naming
        # Left/Right do nothing useful in a flat list: let the window's
        # next/previous-study shortcuts see them.
        if event.key() in (Qt.Key.Key_Left, Qt.Key.Key_Right):
            event.ignore()
            return
        super().keyPressEvent(event)
