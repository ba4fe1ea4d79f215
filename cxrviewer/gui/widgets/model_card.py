"""A bundle's model card (its evaluation, ``manifest.json`` ``model_card``) in a read-only window.

The text of the card, and when the card carries curves (``cxr-train card`` after ``cxr-train
evaluate``) a tab each for the ROC and precision-recall curves (every class, or one chosen) and
the reliability diagram, drawn with pyqtgraph from the points stored in the card.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QHBoxLayout, QLabel, QPlainTextEdit, QTabWidget,
                               QVBoxLayout, QWidget)

from ...core.errors import CxrError
from ...core.model_card import card_curves, card_lines
from ...core.plots import PALETTE

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


def bundle_card_curves(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The checked curves of the card of the bundle at ``path`` (:func:`card_curves`; empty kinds
    when it has none or the manifest cannot be read)."""
    from ...core.bundle import read_manifest

    try:
        return card_curves(read_manifest(path))
    except CxrError:
        return card_curves(None)


#: kind -> (tab title, x axis, y axis, area name, reference: "diagonal" | "prevalence")
KINDS = {"roc": ("ROC", "False positive rate", "True positive rate", "AUROC", "diagonal"),
         "pr": ("Precision-recall", "Recall", "Precision", "AP", "prevalence"),
         "calibration": ("Calibration", "Mean predicted probability", "Fraction positive", "ECE", "diagonal")}
#: where each kind's legend sits (pyqtgraph offsets: negative = from the right / bottom), clear of its curves
LEGEND_OFFSET = {"roc": (-10, -10), "pr": (-10, 10), "calibration": (10, 10)}
#: the class chooser's entry that draws every class
ALL_CLASSES = "All classes"


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _steps(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """A precision-recall step line: up or down first, then flat to the next recall."""
    sx, sy = list(xs[:1]), list(ys[:1])
    for x, y in zip(xs[1:], ys[1:]):
        sx += [sx[-1], x]
        sy += [y, y]
    return sx, sy


class CurvePlot(QWidget):
    """One kind of curve of a card (``roc``, ``pr`` or ``calibration``) in a pyqtgraph plot, with
    a class chooser (every class, or one) for ROC and PR; the reference line dashed grey."""

    def __init__(self, kind: str, curves: Mapping[str, Mapping[str, Any]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind, self.curves = kind, dict(curves)
        _, xlabel, ylabel, _, _ = KINDS[kind]
        self.plot = pg.PlotWidget(self, background="w")
        self.plot.setLabel("bottom", xlabel)
        self.plot.setLabel("left", ylabel)
        self.plot.showGrid(x=True, y=True, alpha=0.12)
        self.plot.setRange(xRange=(0, 1), yRange=(0, 1), padding=0.02)
        self.plot.setMouseEnabled(False, False)
        for side in ("bottom", "left"):
            self.plot.getAxis(side).setPen("k")
            self.plot.getAxis(side).setTextPen("k")
        self.legend = self.plot.addLegend(offset=LEGEND_OFFSET[kind], labelTextColor="k",
                                          brush=pg.mkBrush(255, 255, 255, 230), pen=pg.mkPen(170, 170, 170))
        self.chooser = QComboBox(self)
        self.chooser.addItems([ALL_CLASSES, *self.curves] if kind != "calibration" else list(self.curves))
        self.chooser.currentTextChanged.connect(self.show_class)
        row = QHBoxLayout()
        row.addWidget(QLabel("Class:" if kind != "calibration" else "Predictions:", self))
        row.addWidget(self.chooser, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.plot, 1)
        self.drawn: list[str] = []
        self.show_class(self.chooser.currentText())

    def show_class(self, name: str) -> None:
        """Draw class ``name``'s curve (:data:`ALL_CLASSES`: every class) and the reference."""
        self.plot.clear()
        self.legend.clear()
        self.legend.setColumnCount(2 if name == ALL_CLASSES else 1)
        self.drawn = []
        names = list(self.curves) if name == ALL_CLASSES else [name] if name in self.curves else []
        _, _, _, area, ref = KINDS[self.kind]
        for i, c in enumerate(names):
            r = self.curves[c]
            xs, ys = _nan(r["x"]), _nan(r["y"])
            if self.kind == "pr":
                xs, ys = _steps(xs, ys)
            colour = pg.mkColor(*PALETTE[i % len(PALETTE)])
            shown = "all classes" if c == "all" and self.kind == "calibration" else c
            label = f"{shown} ({area} {r['area']:.3f})" if isinstance(r.get("area"), (int, float)) else shown
            self.plot.plot(xs, ys, pen=pg.mkPen(colour, width=2), name=label, connect="finite",
                           symbol="o" if self.kind == "calibration" else None, symbolSize=6, symbolBrush=colour)
            self.drawn.append(c)
        dash = pg.mkPen((150, 150, 150), width=1, style=Qt.PenStyle.DashLine)
        if ref == "diagonal":
            self.plot.plot([0, 1], [0, 1], pen=dash, name="chance" if self.kind == "roc" else "perfectly calibrated")
        elif len(names) == 1 and isinstance(self.curves[names[0]].get("prevalence"), (int, float)):
            p = float(self.curves[names[0]]["prevalence"])
            self.plot.plot([0, 1], [p, p], pen=dash, name=f"prevalence {p:.3f}")


class ModelCardDialog(QDialog):
    """Monospace, selectable, scrollable text of one card; Copy puts it on the clipboard. With
    ``curves`` (:func:`bundle_card_curves`) the text is the first tab, then one per kind of curve
    the card carries (``self.plots[kind]``: a :class:`CurvePlot`)."""

    def __init__(self, name: str, lines: list[str], parent: QWidget | None = None,
                 curves: Mapping[str, Mapping[str, Any]] | None = None) -> None:
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
        self.plots: dict[str, CurvePlot] = {}
        self.tabs: QTabWidget | None = None
        if curves and any(curves.get(k) for k in KINDS):
            self.tabs = QTabWidget(self)
            self.tabs.addTab(self.text, "Card")
            for kind, (title, *_) in KINDS.items():
                if curves.get(kind):
                    self.plots[kind] = CurvePlot(kind, curves[kind], self.tabs)
                    self.tabs.addTab(self.plots[kind], title)
            lay.addWidget(self.tabs, 1)
        else:
            lay.addWidget(self.text, 1)
        lay.addWidget(buttons)
        self.resize(760, 560 if self.plots else 460)

    @property
    def lines(self) -> list[str]:
        return self.text.toPlainText().split("\n")
