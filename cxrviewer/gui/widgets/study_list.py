"""The worklist as a list: name, labels, status, top findings, annotations.

Follows a :class:`~cxrviewer.gui.state.ViewerState`: selecting a row sets the
state's current index, and the state's index changes select the row. Rows are
addressed by their *worklist index* everywhere (``set_status(row, ..)``,
``set_findings``, ``set_annotations``), also after the user sorted by a
column (click a header) or filtered (:meth:`set_filter`, the dock's filter box).
"""
from __future__ import annotations

from PySide6.QtCore import QSignalBlocker, Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

from ...core.io.worklist import StudyRef
from ..state import ViewerState

COL_NAME, COL_LABELS, COL_STATUS, COL_FINDINGS, COL_ANNOT = 0, 1, 2, 3, 4
COLUMNS = ("Study", "Labels", "Status", "Top findings", "Annot.")
ROLE_ROW = Qt.ItemDataRole.UserRole + 7  # the worklist index of an item
ROLE_SORT = Qt.ItemDataRole.UserRole + 8  # numeric sort key (top probability)


class _Item(QTreeWidgetItem):
    """Sorts the findings column by its top probability, the rest as text."""

    def __lt__(self, other: QTreeWidgetItem) -> bool:
        tree = self.treeWidget()
        col = tree.sortColumn() if tree is not None else 0
        if col == COL_FINDINGS:
            a, b = self.data(col, ROLE_SORT), other.data(col, ROLE_SORT)
            return (a if a is not None else -1.0) < (b if b is not None else -1.0)
        return self.text(col).lower() < other.text(col).lower()


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
        header.setSectionResizeMode(COL_FINDINGS, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(COL_ANNOT, QHeaderView.ResizeMode.ResizeToContents)
        self.setColumnWidth(COL_NAME, 130)
        self.setColumnWidth(COL_FINDINGS, 150)
        header.setSectionsClickable(True)
        header.setSortIndicatorShown(True)
        header.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        header.sortIndicatorChanged.connect(self._on_sort)
        self._items: list[QTreeWidgetItem] = []
        self._filter = ""
        self.currentItemChanged.connect(self._on_current_item_changed)
        state.worklistChanged.connect(self.reload)
        state.currentIndexChanged.connect(self.select_row)

    def reload(self) -> None:
        """Rebuild the rows from ``state.worklist``."""
        with QSignalBlocker(self):
            self.clear()
            self._items = []
            for row, ref in enumerate(self.state.worklist):
                item = _Item([ref.display_name, labels_text(ref), "", "", ""])
                item.setData(COL_NAME, ROLE_ROW, row)
                item.setToolTip(COL_NAME, str(ref.path))
                item.setToolTip(COL_LABELS, labels_text(ref))
                self._items.append(item)
                self.addTopLevelItem(item)
        self.set_filter(self._filter)

    def select_row(self, row: int) -> None:
        """Select ``row`` without feeding the change back to the state."""
        item = self.item_for_row(row)
        with QSignalBlocker(self):
            self.setCurrentItem(item)
        if item is not None:
            self.scrollToItem(item)

    def item_for_row(self, row: int) -> QTreeWidgetItem | None:
        """The item of worklist index ``row`` (whatever the sort order)."""
        return self._items[row] if 0 <= row < len(self._items) else None

    def row_of(self, item: QTreeWidgetItem) -> int:
        value = item.data(COL_NAME, ROLE_ROW)
        return int(value) if value is not None else self.indexOfTopLevelItem(item)

    def set_status(self, row: int, text: str, *, error: bool = False) -> None:
        item = self.item_for_row(row)
        if item is None:
            return
        item.setText(COL_STATUS, text)
        item.setForeground(COL_STATUS, QBrush(QColor("#d33") if error else self.palette().text()))

    def status(self, row: int) -> str:
        item = self.item_for_row(row)
        return item.text(COL_STATUS) if item is not None else ""

    def set_findings(self, row: int, findings: list[tuple[str, float]]) -> None:
        """Top findings ``[(class, probability), ...]`` of a study (most probable first)."""
        item = self.item_for_row(row)
        if item is None:
            return
        text = ", ".join(f"{n} {p:.2f}" for n, p in findings)
        item.setText(COL_FINDINGS, text)
        item.setToolTip(COL_FINDINGS, text)
        item.setData(COL_FINDINGS, ROLE_SORT, float(findings[0][1]) if findings else None)
        self._apply_filter(item)

    def findings(self, row: int) -> str:
        item = self.item_for_row(row)
        return item.text(COL_FINDINGS) if item is not None else ""

    def set_annotations(self, row: int, text: str) -> None:
        """Annotation status of a study (e.g. '3 boxes', 'reviewed'); set by the annotation store."""
        item = self.item_for_row(row)
        if item is not None:
            item.setText(COL_ANNOT, text)

    # ---- filter and sort ----------------------------------------------------
    def set_filter(self, text: str) -> None:
        """Show only rows whose name, labels or findings contain every word of ``text``."""
        self._filter = text.strip().lower()
        for item in self._items:
            self._apply_filter(item)

    def _apply_filter(self, item: QTreeWidgetItem) -> None:
        words = self._filter.split()
        hay = " ".join(item.text(c) for c in (COL_NAME, COL_LABELS, COL_FINDINGS, COL_ANNOT)).lower()
        item.setHidden(bool(words) and not all(w in hay for w in words))

    def visible_rows(self) -> list[int]:
        return [self.row_of(self.topLevelItem(i)) for i in range(self.topLevelItemCount())
                if not self.topLevelItem(i).isHidden()]

    def _on_sort(self, column: int, order: Qt.SortOrder) -> None:
        if column >= 0:
            self.sortItems(column, order)

    def _on_current_item_changed(self, current: QTreeWidgetItem | None, _prev) -> None:
        if current is not None:
            self.state.set_current_index(self.row_of(current))

    def keyPressEvent(self, event) -> None:  # noqa: N802 - Qt naming
        # Left/Right do nothing useful in a flat list: let the window's
        # next/previous-study shortcuts see them.
        if event.key() in (Qt.Key.Key_Left, Qt.Key.Key_Right):
            event.ignore()
            return
        super().keyPressEvent(event)
