"""The findings panel: every class with its probability, most probable first.

Selecting a row selects the class every explanation panel shows
(``classSelected(class_index)``, the index into ``results.classes``).
A "GT" column marks the study's labels (NIH folders) so a reader sees
at once whether the top finding is a labelled one.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PySide6.QtCore import QRect, QSignalBlocker, Qt, Signal
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (QAbstractItemView, QHeaderView, QStyledItemDelegate, QTableWidget,
                               QTableWidgetItem, QWidget)

from ...core.classes import CLASSES

COL_CLASS, COL_PROB, COL_GT = 0, 1, 2
ROLE_CLASS = Qt.ItemDataRole.UserRole + 1


class _BarDelegate(QStyledItemDelegate):
    """Probability as a bar behind its number."""

    def paint(self, painter: QPainter, option, index) -> None:  # noqa: D401 - Qt API
        value = index.data(Qt.ItemDataRole.UserRole)
        if isinstance(value, float) and np.isfinite(value):
            r: QRect = option.rect.adjusted(2, 3, -2, -3)
            painter.save()
            painter.fillRect(QRect(r.left(), r.top(), int(r.width() * max(0.0, min(1.0, value))), r.height()),
                             QColor(255, 140, 40, 150) if value >= 0.5 else QColor(90, 150, 230, 130))
            painter.restore()
        super().paint(painter, option, index)


class FindingsPanel(QTableWidget):
    """Class / probability / GT table, sorted by probability."""

    classSelected = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.setHorizontalHeaderLabels(["Finding", "Probability", "GT"])
        self.verticalHeader().hide()
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        h = self.horizontalHeader()
        h.setSectionResizeMode(COL_CLASS, QHeaderView.ResizeMode.Stretch)
        h.setSectionResizeMode(COL_PROB, QHeaderView.ResizeMode.Fixed)
        h.setSectionResizeMode(COL_GT, QHeaderView.ResizeMode.ResizeToContents)
        self.setColumnWidth(COL_PROB, 90)
        self.setItemDelegateForColumn(COL_PROB, _BarDelegate(self))
        self.classes: tuple[str, ...] = ()
        self.model_classes: tuple[str, ...] = ()  # the loaded model's classes (rows before results)
        self.probabilities: np.ndarray | None = None
        self.itemSelectionChanged.connect(self._on_selection)
        self.set_results(None)

    def set_results(self, results: Any, labels: dict[str, int] | None = None,
                    selected: int | None = None) -> None:
        """Fill from ``results`` (None: the loaded model's classes, else the NIH 14, without probabilities)."""
        classes = (tuple(results.classes) if results is not None and results.classes
                   else self.model_classes or tuple(CLASSES))
        probs = results.probabilities if results is not None else None
        self.classes, self.probabilities = classes, probs
        order = (list(np.argsort(-np.asarray(probs), kind="stable")) if probs is not None
                 else list(range(len(classes))))
        with QSignalBlocker(self):
            self.setRowCount(len(order))
            for row, c in enumerate(order):
                name = classes[c]
                it = QTableWidgetItem(name)
                it.setData(ROLE_CLASS, int(c))
                self.setItem(row, COL_CLASS, it)
                p = float(probs[c]) if probs is not None else float("nan")
                pi = QTableWidgetItem("–" if not np.isfinite(p) else f"{p:.3f}")
                pi.setData(Qt.ItemDataRole.UserRole, p)
                pi.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(row, COL_PROB, pi)
                gt = "" if labels is None else ("✓" if labels.get(name) else "")
                self.setItem(row, COL_GT, QTableWidgetItem(gt))
            if selected is not None:
                self._select(selected)

    def set_model_classes(self, classes: tuple[str, ...] | list[str]) -> None:
        """The loaded model set's classes (an 18-class model: 18 rows); shown until results arrive."""
        self.model_classes = tuple(classes)
        if self.probabilities is None:
            self.set_results(None)

    def _select(self, class_index: int) -> None:
        for row in range(self.rowCount()):
            if self.item(row, COL_CLASS).data(ROLE_CLASS) == class_index:
                self.selectRow(row)
                return

    def select_class(self, class_index: int) -> None:
        """Select a class without emitting ``classSelected``."""
        with QSignalBlocker(self):
            self._select(class_index)

    def class_at_row(self, row: int) -> int:
        return int(self.item(row, COL_CLASS).data(ROLE_CLASS))

    def selected_class(self) -> int | None:
        rows = self.selectionModel().selectedRows()
        return self.class_at_row(rows[0].row()) if rows else None

    def _on_selection(self) -> None:
        c = self.selected_class()
        if c is not None:
            self.classSelected.emit(c)
