"""Layers drawn over an :class:`~cxrviewer.gui.views.image_panel.ImagePanel`.

Every layer works in *original-image pixel coordinates* (x = column,
y = row, origin at the top-left pixel corner), the same coordinates as
:class:`cxrviewer.core.geometry.Box`, so nothing is rescaled by hand.

A layer owns its graphics items and adds them to the panel's ViewBox with
``ignoreBounds=True`` (an overlay never changes the fitted view). Z order:
image 0, heatmap 10, boxes 20, editors 30 (the box editor's layer in
:mod:`cxrviewer.gui.views.box_editor`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QPen
from PySide6.QtWidgets import QGraphicsItem, QGraphicsRectItem

from ...core.classes import CLASSES
from ...core.geometry import Box

log = logging.getLogger(__name__)

# Distinct colours for the 14 ChestX-ray14 classes (+ fallback), readable on grey.
_PALETTE = ["#ff595e", "#ffca3a", "#8ac926", "#1982c4", "#6a4c93", "#ff924c", "#52d1dc",
            "#f15bb5", "#00f5d4", "#fee440", "#9b5de5", "#c5d86d", "#f4a261", "#e76f51"]


def label_color(label: str) -> QColor:
    """A stable colour per class name."""
    idx = CLASSES.index(label) if label in CLASSES else sum(map(ord, label))
    return QColor(_PALETTE[idx % len(_PALETTE)])


class Layer:
    """Base class: a named group of graphics items over the image.

    Subclasses create items in :meth:`_make_items` style helpers and register
    them with :meth:`_add`; the base class handles attach/detach, visibility
    and z order. ``on_image_changed(shape)`` is called when the panel shows a
    new image (a layer tied to the previous study usually clears itself).
    """

    z: float = 10.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.view: pg.ViewBox | None = None
        self._items: list[QGraphicsItem] = []
        self._visible = True
        self.image_shape: tuple[int, int] | None = None

    # ---- lifecycle ------------------------------------------------------
    def attach(self, view: pg.ViewBox) -> None:
        self.view = view
        for item in self._items:
            self._place(item)

    def detach(self) -> None:
        if self.view is not None:
            for item in self._items:
                self.view.removeItem(item)
        self.view = None

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        self.image_shape = shape

    # ---- items ----------------------------------------------------------
    def _place(self, item: QGraphicsItem) -> None:
        item.setZValue(self.z)
        item.setVisible(self._visible)
        if self.view is not None:
            self.view.addItem(item, ignoreBounds=True)

    def _add(self, item: QGraphicsItem) -> QGraphicsItem:
        self._items.append(item)
        self._place(item)
        return item

    def clear(self) -> None:
        """Remove every item of this layer."""
        if self.view is not None:
            for item in self._items:
                self.view.removeItem(item)
        self._items.clear()

    @property
    def items(self) -> list[QGraphicsItem]:
        return list(self._items)

    # ---- visibility -----------------------------------------------------
    @property
    def visible(self) -> bool:
        return self._visible

    def set_visible(self, visible: bool) -> None:
        self._visible = bool(visible)
        for item in self._items:
            item.setVisible(self._visible)


class HeatmapLayer(Layer):
    """A colour-mapped heatmap (CAM, attention, disease mask) stretched over the image.

    The map may be smaller than the image (e.g. a 7x7 or 32x32 CAM): it is
    drawn over the full image rectangle, each map cell covering
    ``image / map`` pixels (the same stretch the papers use to upsample CAMs).
    """

    z = 10.0

    def __init__(self, name: str = "heatmap", *, colormap: str = "inferno",
                 opacity: float = 0.45) -> None:
        super().__init__(name)
        self.item = pg.ImageItem(axisOrder="row-major")
        self.colormap = colormap
        self.opacity = opacity
        self._heat: np.ndarray | None = None
        self._add(self.item)
        self.item.setVisible(False)

    def set_heatmap(self, heat: np.ndarray | None, *, levels: tuple[float, float] | None = None,
                    colormap: str | None = None, opacity: float | None = None) -> None:
        """Show ``heat`` (2-D float; ``None`` hides); levels default to (min, max)."""
        if colormap is not None:
            self.colormap = colormap
        if opacity is not None:
            self.opacity = float(opacity)
        self._heat = None if heat is None else np.asarray(heat, dtype=np.float32)
        if self._heat is None or self._heat.ndim != 2 or self._heat.size == 0:
            self._heat = None
            self.item.clear()
            self.item.setVisible(False)
            return
        lo, hi = levels if levels is not None else (float(np.nanmin(self._heat)),
                                                      float(np.nanmax(self._heat)))
        if hi <= lo:
            hi = lo + 1e-6
        lut = pg.colormap.get(self.colormap).getLookupTable(nPts=256, alpha=False)
        self.item.setImage(self._heat, autoLevels=False, levels=(lo, hi), lut=lut)
        self.item.setOpacity(self.opacity)
        self._fit_rect()
        self.item.setVisible(self._visible)

    @property
    def heatmap(self) -> np.ndarray | None:
        return self._heat

    def _fit_rect(self) -> None:
        if self._heat is None:
            return
        h, w = self.image_shape if self.image_shape else self._heat.shape
        self.item.setRect(QRectF(0, 0, float(w), float(h)))

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.set_heatmap(None)  # a heatmap belongs to one study

    def set_visible(self, visible: bool) -> None:
        self._visible = bool(visible)
        self.item.setVisible(self._visible and self._heat is not None)

    def clear(self) -> None:  # keep the ImageItem, just empty it
        self.set_heatmap(None)


def box_rect(box: Box, colour: QColor, width: float, *, dashed: bool) -> QGraphicsRectItem:
    """An unfilled rectangle of ``box`` (original pixels) with a cosmetic pen (screen pixels at any zoom)."""
    pen = QPen(colour, width)
    pen.setCosmetic(True)
    if dashed:
        pen.setStyle(Qt.PenStyle.DashLine)
    rect = QGraphicsRectItem(QRectF(box.x, box.y, box.w, box.h))
    rect.setPen(pen)
    rect.setBrush(QBrush(Qt.BrushStyle.NoBrush))
    return rect


class BoxLayer(Layer):
    """Read-only rectangles with a class label each (ground truth, proposals)."""

    z = 20.0

    def __init__(self, name: str = "boxes", *, dashed: bool = False, show_scores: bool = True) -> None:
        super().__init__(name)
        self.dashed = dashed
        self.show_scores = show_scores
        self.boxes: list[Box] = []

    def set_boxes(self, boxes: Sequence[Box]) -> None:
        """Replace the drawn boxes (``Box`` coordinates are original-image pixels)."""
        self.clear()
        self.boxes = list(boxes)
        for box in self.boxes:
            color = label_color(box.label)
            self._add(box_rect(box, color, 2.0, dashed=self.dashed))
            text = box.label if box.score is None or not self.show_scores else f"{box.label} {box.score:.2f}"
            fill = QColor(0, 0, 0, 150)
            label = pg.TextItem(text, color=color, anchor=(0, 1), fill=fill)
            label.setPos(box.x, box.y)
            self._add(label)

    def clear(self) -> None:
        super().clear()
        self.boxes = []

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.clear()


class PriorLayer(BoxLayer):
    """The location prior's fixed box per class: grey, dashed, labelled ``prior · <class>`` at its
    lower right corner, drawn under the proposals and transparent to the mouse (a reference, never
    selectable, editable or saved; not part of any annotation)."""

    z = 19.0
    COLOUR = QColor(190, 190, 190)

    def set_boxes(self, boxes: Sequence[Box]) -> None:
        self.clear()
        self.boxes = list(boxes)
        for box in self.boxes:
            rect = box_rect(box, self.COLOUR, 1.5, dashed=True)
            label = pg.TextItem(f"prior · {box.label}", color=self.COLOUR, anchor=(1, 0), fill=QColor(0, 0, 0, 150))
            label.setPos(box.x + box.w, box.y + box.h)
            for item in (rect, label):
                item.setAcceptedMouseButtons(Qt.MouseButton.NoButton)
                item.setAcceptHoverEvents(False)
                item.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsSelectable, False)
                item.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsMovable, False)
                item.setToolTip("Location prior: the median training box of the class (a reference, not a finding)")
                self._add(item)
