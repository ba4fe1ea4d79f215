"""Layers drawn over an :class:`~cxrviewer.gui.views.image_panel.ImagePanel`.

Every layer works in *original-image pixel coordinates* (x = column,
y = row, origin at the top-left pixel corner), the same coordinates as
:class:`cxrviewer.core.geometry.Box`, so nothing is rescaled by hand.

A layer owns its graphics items and adds them to the panel's ViewBox with
``ignoreBounds=True`` (an overlay never changes the fitted view). Z order:
image 0, heatmap 10, prior 17, model proposals 18 (dashed), ground truth 20, the box
editor's accepted boxes 30 and selection 32 (:mod:`cxrviewer.gui.views.box_editor`; its
proposals at 18); a label sits 0.5 above its box, so ground truth and its labels are never
under a proposal.

Labels: a solid box (ground truth, accepted) has its label on the class colour in black or
white (:func:`cxrviewer.core.classes.text_colour`), a proposal in its class colour lightened to
4.5:1 on near black (WCAG AA either way). :func:`place_labels` puts each label above, inside or
below its box, or stacked beside it, where it covers no other label (fixed screen size, so it is
redone when the zoom changes).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QPen
from PySide6.QtWidgets import QGraphicsItem, QGraphicsRectItem

from ...core.classes import class_colour, lighten_to_contrast, text_colour
from ...core.geometry import Box

log = logging.getLogger(__name__)

#: (x, y, w, h) in view units (original-image pixels; y down)
Rect = tuple[float, float, float, float]
#: the background of proposal labels
DARK_LABEL = "#141414"
#: how far a label may be stacked beside its box (label heights)
MAX_STACK = 6


def label_color(label: str) -> QColor:
    """A stable colour per class name (outlines)."""
    return QColor(class_colour(label))


def label_style(label: str, *, proposal: bool = False) -> tuple[QColor, QColor]:
    """(text, background) of a box label: black/white on the class colour, or for a proposal the
    class colour (lightened to 4.5:1) on near black."""
    if proposal:
        return QColor(lighten_to_contrast(class_colour(label), DARK_LABEL)), QColor(DARK_LABEL)
    bg = class_colour(label)
    return QColor(text_colour(bg)), QColor(bg)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(r: Rect, bounds: Rect) -> bool:
    return (r[0] >= bounds[0] and r[1] >= bounds[1] and r[0] + r[2] <= bounds[0] + bounds[2]
            and r[1] + r[3] <= bounds[1] + bounds[3])


def _free(r: Rect, placed: Sequence[Rect]) -> bool:
    """No rect of ``placed`` overlaps ``r`` (:func:`_overlaps`, inlined: the layout runs on every
    edit and zoom)."""
    x1, y1 = r[0], r[1]
    x2, y2 = x1 + r[2], y1 + r[3]
    for qx, qy, qw, qh in placed:
        if x1 < qx + qw and qx < x2 and y1 < qy + qh and qy < y2:
            return False
    return True


def _candidates(box: Rect, w: float, h: float) -> list[Rect]:
    """Label positions by preference: above, inside top, below, inside bottom (left, then
    right aligned), then stacked further below and above."""
    x, y, bw, bh = box
    right = x + bw - w
    spots = [(x, y - h), (x, y), (x, y + bh), (x, y + bh - h), (right, y - h), (right, y + bh)]
    for k in range(1, MAX_STACK + 1):
        spots += [(x, y + bh + k * h), (x, y - (k + 1) * h)]
    return [(sx, sy, w, h) for sx, sy in spots]


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], *, taken: Sequence[Rect] = (),
                 bounds: Rect | None = None, gap: float = 0.0) -> list[Rect | None]:
    """Where each label goes (in order: earlier labels win), or None where no spot is free.

    ``sizes``: label (w, h) in view units; ``taken``: rects other labels already hold;
    ``bounds``: prefer spots inside it (the image); ``gap``: spacing kept between labels.
    """
    placed: list[Rect] = [(t[0] - gap, t[1] - gap, t[2] + 2 * gap, t[3] + 2 * gap) for t in taken]
    out: list[Rect | None] = []
    for box, (w, h) in zip(boxes, sizes):
        spots = _candidates(box, w, h)
        if bounds is not None:
            inside = [_inside(r, bounds) for r in spots]
            spots = [r for r, i in zip(spots, inside) if i] + [r for r, i in zip(spots, inside) if not i]
        spot = next((r for r in spots if _free(r, placed)), None)
        out.append(spot)
        if spot is not None:
            placed.append((spot[0] - gap, spot[1] - gap, spot[2] + 2 * gap, spot[3] + 2 * gap))
    return out


def layout_text_items(view: pg.ViewBox | None, entries: Sequence[tuple[pg.TextItem, Rect]], *,
                      taken: Sequence[Rect] = (), bounds: Rect | None = None,
                      keep: Sequence[bool] = ()) -> list[Rect]:
    """Move ``(label, box)`` text items (anchor (0, 0)) to :func:`place_labels` spots at the view's
    current zoom; a label without a free spot is hidden, unless ``keep[i]`` (then it stays at its
    first choice; hidden = opacity 0, so the layer's visibility stays the layer's). Returns the
    rects of the shown labels (view units)."""
    if view is None or not entries:
        return []
    px, py = view.viewPixelSize()
    if not (px > 0 and py > 0 and math.isfinite(px) and math.isfinite(py)):
        return []
    sizes = []
    for label, _ in entries:
        r = label.textItem.boundingRect()
        sizes.append((r.width() * px, r.height() * py))
    spots = place_labels([b for _, b in entries], sizes, taken=taken, bounds=bounds, gap=1.0 * px)
    shown = []
    for i, ((label, box), spot, size) in enumerate(zip(entries, spots, sizes)):
        if spot is None and i < len(keep) and keep[i]:
            spot = _candidates(box, *size)[0]
        if spot is not None:
            pos = label.pos()
            if pos.x() != spot[0] or pos.y() != spot[1]:  # (an unchanged item is not repainted)
                label.setPos(spot[0], spot[1])
            shown.append(spot)
        opacity = 1.0 if spot is not None else 0.0
        if label.opacity() != opacity:
            label.setOpacity(opacity)
    return shown


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
    """Read-only rectangles with a class label each (ground truth; dashed: model proposals).

    Labels are laid out so they do not cover one another (:func:`layout_text_items`, again on
    every zoom); :attr:`label_rects` are the shown ones, which the box editor keeps clear of.
    """

    z = 20.0
    #: z of a dashed (proposal) layer: under the ground truth
    PROPOSAL_Z = 18.0

    def __init__(self, name: str = "boxes", *, dashed: bool = False, show_scores: bool = True,
                 avoid: "BoxLayer | None" = None) -> None:
        super().__init__(name)
        self.dashed = dashed
        self.avoid = avoid  # a layer whose shown labels this one's labels keep clear of (the ground truth)
        self.show_scores = show_scores
        if dashed:
            self.z = self.PROPOSAL_Z
        self.boxes: list[Box] = []
        self.labels: list[pg.TextItem] = []
        self.label_rects: list[Rect] = []

    def attach(self, view: pg.ViewBox) -> None:
        super().attach(view)
        view.sigTransformChanged.connect(self._on_transform)

    def detach(self) -> None:
        if self.view is not None:
            try:
                self.view.sigTransformChanged.disconnect(self._on_transform)
            except (RuntimeError, TypeError):  # never connected
                pass
        super().detach()

    def _on_transform(self, *_args: object) -> None:
        self.relayout()

    def set_boxes(self, boxes: Sequence[Box], *, texts: Sequence[str] | None = None) -> None:
        """Replace the drawn boxes (original-image pixels); ``texts``: the labels (default: the
        class, and the raw score when ``show_scores``)."""
        self.clear()
        self.boxes = list(boxes)
        for i, box in enumerate(self.boxes):
            self._add(box_rect(box, label_color(box.label), 2.0, dashed=self.dashed))
            if texts is not None:
                text = texts[i]
            else:
                text = box.label if box.score is None or not self.show_scores else f"{box.label} {box.score:.2f}"
            fg, bg = label_style(box.label, proposal=self.dashed)
            label = pg.TextItem(text, color=fg, anchor=(0, 0), fill=bg)
            label.setPos(box.x, box.y)
            self._add(label)
            label.setZValue(self.z + 0.5)
            self.labels.append(label)
        self.relayout()

    def relayout(self) -> None:
        """Place the labels for the current zoom (see :func:`place_labels`)."""
        bounds = None if self.image_shape is None else (0.0, 0.0, float(self.image_shape[1]),
                                                        float(self.image_shape[0]))
        entries = [(lab, (b.x, b.y, b.w, b.h)) for lab, b in zip(self.labels, self.boxes)]
        other = self.avoid
        taken = other.label_rects if other is not None and other.visible else []
        self.label_rects = layout_text_items(self.view, entries, taken=taken, bounds=bounds,
                                             keep=[not self.dashed] * len(entries))

    def clear(self) -> None:
        super().clear()
        self.boxes = []
        self.labels = []
        self.label_rects = []

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.clear()


class PriorLayer(BoxLayer):
    """The location prior's fixed box per class: grey, dashed, labelled ``prior · <class>`` at its
    lower right corner, drawn under the proposals and transparent to the mouse (a reference, never
    selectable, editable or saved; not part of any annotation)."""

    z = 17.0
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
