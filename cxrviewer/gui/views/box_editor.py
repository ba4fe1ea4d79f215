"""The box editor: draw, select, move and resize boxes over an :class:`ImagePanel`.

A pure *view*: it draws what it is given (:meth:`BoxEditor.set_items`) and turns
mouse gestures into requests (``drawRequested``, ``geometryRequested``); the
edit commands (:mod:`cxrviewer.gui.annotation_edits`) write them to the annotation
store and hand the stored rows back. So the screen always shows
the store, and a drag commits exactly **one** edit, on mouse release.

Interaction (the CREATE/EDIT split of LabelImg and labelme, with CVAT's
one-shot "N draws one box"):

* **Draw mode** (``set_draw_mode(True)``, key W or N): the next left drag draws
  a box of :attr:`BoxEditor.draw_label`; the mode ends after one box (or Esc).
* **Edit** (default): a left drag that starts on a corner/edge of a box resizes
  it (grab tolerance :attr:`GRAB_PX` screen pixels at any zoom), inside a box
  moves it, elsewhere pans the image as before; a click selects the box under
  the cursor (Ctrl/Shift+click toggles), a click on nothing clears the selection.
* Previews are clamped to the image while dragging (a moved box keeps its size);
  a drawn box under :attr:`MIN_SIZE` image pixels wide or high is refused
  (``refused`` signal) -- the store refuses zero-area boxes as well.
* Accepted boxes are solid, model proposals dashed; the selection is drawn
  thicker with 8 handles of constant screen size.
* Z order: proposals under the ground truth (:mod:`.layers`), accepted boxes above it, the
  selection on top. Labels say what a proposal's score is (``p 0.62`` / ``map 1.94``,
  :func:`cxrviewer.core.proposals.score_text`) and are placed where they cover no other label,
  the ground truth's included (:func:`.layers.layout_text_items`, redone on zoom).

Coordinates are original-image pixels (the panel's view coordinates), the same as
:class:`~cxrviewer.core.geometry.Box` and the store's rows.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyqtgraph as pg
from PySide6.QtCore import QObject, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPen
from PySide6.QtWidgets import QGraphicsItem, QGraphicsRectItem

from ...core.classes import CLASSES
from ...core.proposals import score_text
from .layers import BoxLayer, Layer, Rect, label_color, label_style, layout_text_items

log = logging.getLogger(__name__)

GraphicsItemT = TypeVar("GraphicsItemT", bound=QGraphicsItem)

#: (kind, id): kind is "box" (accepted) or "proposal" (a model's, pending).
ItemKey = tuple[str, int]

#: z of the outlines (labels 0.5 above): proposals under the ground truth layer (20),
#: accepted boxes over it, the selection (and the box being drawn) on top
Z_PROPOSAL, Z_BOX, Z_SELECTED = 18.0, 30.0, 32.0

#: Resize parts of a rectangle; "inside" moves it.
_PARTS = ("nw", "n", "ne", "e", "se", "s", "sw", "w")
_CURSORS = {
    "nw": Qt.CursorShape.SizeFDiagCursor, "se": Qt.CursorShape.SizeFDiagCursor,
    "ne": Qt.CursorShape.SizeBDiagCursor, "sw": Qt.CursorShape.SizeBDiagCursor,
    "n": Qt.CursorShape.SizeVerCursor, "s": Qt.CursorShape.SizeVerCursor,
    "e": Qt.CursorShape.SizeHorCursor, "w": Qt.CursorShape.SizeHorCursor,
    "inside": Qt.CursorShape.SizeAllCursor,
}


@dataclass(frozen=True)
class EditorItem:
    """What the editor draws for one box or proposal (original-image pixels)."""

    kind: str  # "box" | "proposal"
    id: int
    label: str
    x: float
    y: float
    w: float
    h: float
    source: str = "manual"  # "manual" | "model" (boxes); "model" for proposals
    model_name: str | None = None
    score: float | None = None
    annotator: str = ""

    @property
    def key(self) -> ItemKey:
        return (self.kind, self.id)

    @property
    def rect(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.w, self.h)

    @classmethod
    def from_box(cls, b) -> "EditorItem":
        """From a store :class:`~cxrviewer.core.annotations.AnnotatedBox`."""
        return cls("box", int(b.id), b.label, float(b.x), float(b.y), float(b.w), float(b.h),
                   b.source, b.model_name, b.score, b.annotator)

    @classmethod
    def from_proposal(cls, p) -> "EditorItem":
        """From a store :class:`~cxrviewer.core.annotations.Proposal`."""
        return cls("proposal", int(p.id), p.label, float(p.x), float(p.y), float(p.w), float(p.h),
                   "model", p.model_name, p.score, "")

    def caption(self) -> str:
        """Class, the score as what it is (a model's box) and "?" for a proposal."""
        text = self.label
        if self.score is not None:
            text += f" {score_text(self.model_name or '', self)}"
        if self.kind == "proposal":
            text += " ?"
        return text

    @property
    def z(self) -> float:
        """Outline z: proposals under the ground truth (20), accepted boxes above it."""
        return Z_PROPOSAL if self.kind == "proposal" else Z_BOX


# ---- pure geometry (unit-tested without Qt) -------------------------------------------
def hit_test(items: Sequence[EditorItem], x: float, y: float, tol: float,
             selected: Iterable[ItemKey] = ()) -> tuple[ItemKey, str] | None:
    """The item and part (a resize part of ``_PARTS`` or ``"inside"``) under ``(x, y)``.

    ``tol`` is the grab distance in image pixels. Corners/edges of selected items
    win, then corners/edges of any item, then the smallest item containing the point.
    """
    sel = set(selected)
    ordered = sorted(items, key=lambda it: (it.key not in sel, it.w * it.h))
    for it in ordered:
        part = _edge_part(it, x, y, tol)
        if part is not None:
            return it.key, part
    inside = [it for it in items if it.x <= x <= it.x + it.w and it.y <= y <= it.y + it.h]
    if inside:
        best = min(inside, key=lambda it: (it.key not in sel, it.w * it.h))
        return best.key, "inside"
    return None


def _edge_part(it: EditorItem, x: float, y: float, tol: float) -> str | None:
    x0, y0, x1, y1 = it.x, it.y, it.x + it.w, it.y + it.h
    if not (x0 - tol <= x <= x1 + tol and y0 - tol <= y <= y1 + tol):
        return None
    # a small box keeps an inside grab area: the tolerance shrinks to a third of it
    tx, ty = min(tol, it.w / 3.0), min(tol, it.h / 3.0)
    west, east = abs(x - x0) <= tx, abs(x - x1) <= tx
    north, south = abs(y - y0) <= ty, abs(y - y1) <= ty
    if west and east:
        west, east = x < (x0 + x1) / 2, x >= (x0 + x1) / 2
    if north and south:
        north, south = y < (y0 + y1) / 2, y >= (y0 + y1) / 2
    v = "n" if north else ("s" if south else "")
    h = "w" if west else ("e" if east else "")
    part = v + h
    return part or None


def resize_rect(rect: tuple[float, float, float, float], part: str, dx: float, dy: float,
                width: float, height: float) -> tuple[float, float, float, float]:
    """Move the edges named by ``part`` by ``(dx, dy)``; normalised and clamped to the image."""
    x0, y0, w, h = rect
    x1, y1 = x0 + w, y0 + h
    if "w" in part:
        x0 += dx
    if "e" in part:
        x1 += dx
    if "n" in part:
        y0 += dy
    if "s" in part:
        y1 += dy
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    return (x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0))


def move_rect(rect: tuple[float, float, float, float], dx: float, dy: float,
              width: float, height: float) -> tuple[float, float, float, float]:
    """Translate by ``(dx, dy)``, stopping at the image border (the size is kept)."""
    x, y, w, h = rect
    dx = min(max(dx, -x), float(width) - (x + w)) if w <= width else -x
    dy = min(max(dy, -y), float(height) - (y + h)) if h <= height else -y
    return (x + dx, y + dy, w, h)


def span_rect(x0: float, y0: float, x1: float, y1: float, width: float,
              height: float) -> tuple[float, float, float, float]:
    """The box spanned by two drag points, clamped to the image."""
    ax, bx = sorted((x0, x1))
    ay, by = sorted((y0, y1))
    ax, bx = max(0.0, ax), min(float(width), bx)
    ay, by = max(0.0, ay), min(float(height), by)
    return (ax, ay, max(0.0, bx - ax), max(0.0, by - ay))


# ---- graphics -----------------------------------------------------------------------
class _Handle(QGraphicsRectItem):
    """A resize handle of constant screen size (ignores the view's zoom)."""

    SIZE = 8.0

    def __init__(self, color: QColor) -> None:
        s = self.SIZE
        super().__init__(-s / 2, -s / 2, s, s)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations, True)
        pen = QPen(QColor("black"), 1.0)
        pen.setCosmetic(True)
        self.setPen(pen)
        self.setBrush(QBrush(color))


class _Drawn:
    """The graphics of one editor item: outline, caption, handles shown when selected.

    :meth:`update` restyles them in place (a selection change, a moved box): building a
    pyqtgraph TextItem costs about 1 ms, so an edit rebuilds no item.
    """

    def __init__(self, layer: "_EditorLayer", item: EditorItem, selected: bool) -> None:
        self.layer = layer
        self.rect = layer.add(QGraphicsRectItem())
        self.text: pg.TextItem | None = None
        self.handles: list[_Handle] = []
        self.item = item
        self.selected = not selected  # (so that update() styles everything)
        self.shown: tuple[float, float, float, float] = item.rect
        self.update(item, selected)

    def update(self, item: EditorItem, selected: bool) -> None:
        """Show ``item`` (``selected`` or not), changing only what differs."""
        old, was = self.item, self.selected
        self.item, self.selected = item, selected
        color = label_color(item.label)
        z = Z_SELECTED if selected else item.z
        restyle = self.text is None or was != selected or old.label != item.label or old.kind != item.kind
        if restyle:
            pen = QPen(QColor("white") if selected else color, 3.0 if selected else 2.0)
            pen.setCosmetic(True)
            if item.kind == "proposal":
                pen.setStyle(Qt.PenStyle.DashLine)
            self.rect.setPen(pen)
            fill = QColor(color)
            fill.setAlpha(40 if selected else 0)
            self.rect.setBrush(QBrush(fill) if selected else QBrush(Qt.BrushStyle.NoBrush))
            self.rect.setZValue(z)
            if selected and not self.handles:  # made once; hidden (opacity 0) when not selected
                self.handles = [self.layer.add(_Handle(color)) for _ in _PARTS]
            for handle in self.handles:
                handle.setBrush(QBrush(color))
                handle.setZValue(z + 1.0)
                handle.setOpacity(1.0 if selected else 0.0)
        if self.text is None or old.label != item.label or old.kind != item.kind:
            if self.text is not None:
                self.layer.remove(self.text)
            fg, bg = label_style(item.label, proposal=item.kind == "proposal")
            self.text = self.layer.add(pg.TextItem(item.caption(), color=fg, anchor=(0, 0), fill=bg))
        elif old.caption() != item.caption():
            self.text.setText(item.caption())
        self.text.setZValue(z + 0.5)
        if restyle or self.shown != item.rect:
            self.set_rect(item.rect)

    @property
    def graphics(self) -> list[QGraphicsItem]:
        return [self.rect, self.text, *self.handles]

    def set_rect(self, rect: tuple[float, float, float, float]) -> None:
        self.shown = tuple(rect)  # type: ignore[assignment]
        x, y, w, h = rect
        self.rect.setRect(QRectF(x, y, w, h))
        self.text.setPos(x, y)
        if self.handles and self.selected:
            pts = {"nw": (x, y), "n": (x + w / 2, y), "ne": (x + w, y), "e": (x + w, y + h / 2),
                   "se": (x + w, y + h), "s": (x + w / 2, y + h), "sw": (x, y + h),
                   "w": (x, y + h / 2)}
            for part, handle in zip(_PARTS, self.handles):
                handle.setPos(QPointF(*pts[part]))


class _EditorLayer(Layer):
    z = 30.0

    def __init__(self, name: str, on_shape) -> None:
        super().__init__(name)
        self._on_shape = on_shape

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self._on_shape()

    def add(self, item: GraphicsItemT) -> GraphicsItemT:
        """Show ``item`` over the image (this layer's z order and visibility)."""
        self._add(item)
        return item

    def remove(self, item: QGraphicsItem) -> None:
        """Take one item off the view (the opposite of :meth:`add`)."""
        if self.view is not None:
            self.view.removeItem(item)
        if item in self._items:
            self._items.remove(item)


@dataclass
class _Drag:
    mode: str  # "draw" | "move" | "resize"
    key: ItemKey | None
    part: str
    start: tuple[float, float]
    rect: tuple[float, float, float, float]
    current: tuple[float, float, float, float]


class BoxEditor(QObject):
    """Box drawing/editing tool on one :class:`ImagePanel` (see the module docstring).

    Signals
    -------
    ``drawRequested(str label, float x, float y, float w, float h)``
        a box was drawn (already clamped to the image).
    ``geometryRequested(str kind, int id, float x, float y, float w, float h)``
        a move or resize ended with a new geometry.
    ``selectionChanged(list keys)``
        the selected :data:`ItemKey` list changed.
    ``drawModeChanged(bool)``, ``drawLabelChanged(str)``, ``refused(str message)``.
    """

    drawRequested = Signal(str, float, float, float, float)
    geometryRequested = Signal(str, int, float, float, float, float)
    selectionChanged = Signal(list)
    drawModeChanged = Signal(bool)
    drawLabelChanged = Signal(str)
    refused = Signal(str)

    GRAB_PX = 6.0  # screen pixels around an edge that grab it
    MIN_SIZE = 1.0  # image pixels: smaller drawn boxes are refused as empty

    def __init__(self, panel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.panel = panel
        self.enabled = True
        self.draw_label: str = CLASSES[0]
        self._items: list[EditorItem] = []
        self._drawn: dict[ItemKey, _Drawn] = {}
        self._selected: list[ItemKey] = []
        self._draw_mode = False
        self._drag: _Drag | None = None
        self._preview: _Drawn | None = None
        #: the shown labels' rects (view units), after the last layout
        self.label_rects: list[Rect] = []
        self.layer = panel.add_layer(_EditorLayer("box_editor", self._on_image_changed))
        panel.view.drag_interceptors.insert(0, self._on_drag)
        panel.view.sigTransformChanged.connect(self._layout_labels)  # labels keep their screen size
        panel.scene().sigMouseClicked.connect(self._on_click)
        panel.scene().sigMouseMoved.connect(self._on_hover)

    # ---- content ------------------------------------------------------------------
    @property
    def items(self) -> list[EditorItem]:
        return list(self._items)

    def item(self, key: ItemKey) -> EditorItem | None:
        return next((it for it in self._items if it.key == key), None)

    def set_items(self, items: Sequence[EditorItem], *, keep_selection: bool = True,
                  selected: Sequence[ItemKey] | None = None) -> None:
        """Replace what is drawn (the store's rows for the current study).

        ``selected`` replaces the selection in the same redraw (else it is kept where
        the items still exist, or cleared with ``keep_selection=False``).
        """
        self._cancel_drag()
        self._items = list(items)
        keys = {it.key for it in self._items}
        old = list(self._selected)
        base = list(selected) if selected is not None else (old if keep_selection else [])
        self._selected = [k for k in dict.fromkeys(tuple(k) for k in base) if k in keys]  # type: ignore[misc]
        self._redraw()
        if self._selected != old:
            self.selectionChanged.emit(list(self._selected))

    def clear(self) -> None:
        self.set_items([], keep_selection=False)

    def outline(self, key: ItemKey) -> QGraphicsRectItem | None:
        """The rectangle drawn for an item (None when it is not drawn)."""
        drawn = self._drawn.get(key)
        return drawn.rect if drawn is not None else None

    def _on_image_changed(self) -> None:
        """A new image: drop a drag in flight and redraw (the controller sends new items)."""
        self._drag = None
        if getattr(self, "layer", None) is not None:
            self._preview = None
            self._redraw(full=True)

    def _redraw(self, full: bool = False) -> None:
        """Sync the graphics with ``_items``/selection: items that stay are restyled in place
        (:meth:`_Drawn.update`), new ones built, gone ones removed."""
        if full or self.layer.image_shape is None:
            self._drop_preview()
            self.layer.clear()
            self._drawn.clear()
            if self.layer.image_shape is None:
                return
        # a drawn box's preview becomes the stored box's graphics (already built: caption, handles)
        preview, self._preview = self._preview, None
        sel = set(self._selected)
        keep: dict[ItemKey, _Drawn] = {}
        for it in self._items:
            d = self._drawn.pop(it.key, None)
            if d is None and preview is not None and it.kind == "box" and it.key in sel:
                d, preview = preview, None
                d.update(it, True)
            elif d is None:
                d = _Drawn(self.layer, it, it.key in sel)
            elif d.item != it or d.selected != (it.key in sel) or d.shown != it.rect:
                d.update(it, it.key in sel)
            keep[it.key] = d
        for d in [*self._drawn.values(), *([preview] if preview is not None else [])]:
            self._remove(d)
        self._drawn = keep
        self._layout_labels()

    def _layout_labels(self, *_args: object) -> None:
        """Place the labels where they cover no other: accepted boxes first, then the selected
        proposal, then proposals best first, clear of the panel's other box layers (ground truth)."""
        shape = self.layer.image_shape
        if shape is None or not self._drawn:
            self.label_rects = []
            return
        taken = [r for lay in getattr(self.panel, "layers", {}).values()
                 if isinstance(lay, BoxLayer) and lay.visible for r in lay.label_rects]
        sel = set(self._selected)
        order = sorted(self._drawn.values(),
                       key=lambda d: 0 if d.item.kind == "box" else (1 if d.item.key in sel else 2))
        s = float(getattr(self.panel, "display_scale", 1.0) or 1.0)
        self.label_rects = layout_text_items(
            self.layer.view, [(d.text, d.shown) for d in order], taken=taken,
            bounds=(0.0, 0.0, shape[1] * s, shape[0] * s), keep=[d.item.kind == "box" for d in order])

    def _remove(self, d: _Drawn) -> None:
        for g in d.graphics:
            self.layer.remove(g)

    def _drop_preview(self) -> None:
        if self._preview is not None:
            self._remove(self._preview)
            self._preview = None

    # ---- selection ----------------------------------------------------------------
    @property
    def selected(self) -> list[ItemKey]:
        return list(self._selected)

    def select(self, keys: Iterable[ItemKey]) -> None:
        known = {it.key for it in self._items}
        new = [k for k in dict.fromkeys(tuple(k) for k in keys) if k in known]  # type: ignore[misc]
        if new != self._selected:
            self._selected = new
            self._redraw()
            self.selectionChanged.emit(list(self._selected))

    def select_step(self, delta: int) -> None:
        """Select the next (+1) / previous (-1) item in drawing order."""
        if not self._items:
            return
        keys = [it.key for it in self._items]
        cur = keys.index(self._selected[-1]) if self._selected and self._selected[-1] in keys else -1
        if cur < 0:
            nxt = 0 if delta > 0 else len(keys) - 1
        else:
            nxt = (cur + delta) % len(keys)
        self.select([keys[nxt]])

    # ---- draw mode ---------------------------------------------------------------
    @property
    def draw_mode(self) -> bool:
        return self._draw_mode

    def set_draw_label(self, label: str) -> None:
        """The class of the next drawn box."""
        self.draw_label = label
        self.drawLabelChanged.emit(label)

    def set_draw_mode(self, on: bool) -> None:
        on = bool(on) and self.enabled
        if on != self._draw_mode:
            self._draw_mode = on
            self.panel.viewport().setCursor(Qt.CursorShape.CrossCursor if on
                                            else Qt.CursorShape.ArrowCursor)
            self.drawModeChanged.emit(on)

    def set_enabled(self, on: bool) -> None:
        """Editing on/off (boxes stay drawn; read-only stores and no study disable it)."""
        self.enabled = bool(on)
        if not self.enabled:
            self._cancel_drag()
            self.set_draw_mode(False)

    def cancel(self) -> None:
        """Esc: end draw mode and an unfinished drag, else clear the selection."""
        if self._drag is not None or self._draw_mode:
            self._cancel_drag()
            self.set_draw_mode(False)
        else:
            self.select([])

    # ---- mouse ---------------------------------------------------------------------
    def _image_size(self) -> tuple[float, float] | None:
        shape = self.layer.image_shape
        s = float(getattr(self.panel, "display_scale", 1.0) or 1.0)  # view units per pixel
        return None if shape is None else (float(shape[1]) * s, float(shape[0]) * s)

    def _to_image(self, scene_pos: QPointF) -> tuple[float, float]:
        p = self.panel.view.mapSceneToView(scene_pos)
        return float(p.x()), float(p.y())

    def _tolerance(self) -> float:
        px = self.panel.view.viewPixelSize()[0]
        return self.GRAB_PX * (px if px and math.isfinite(px) else 1.0)

    def hit(self, x: float, y: float) -> tuple[ItemKey, str] | None:
        return hit_test(self._items, x, y, self._tolerance(), self._selected)

    def _on_drag(self, ev) -> bool:
        """``view.drag_interceptors`` hook: True for the drags the editor owns."""
        if ev.isStart():
            if not self.enabled or ev.button() != Qt.MouseButton.LeftButton:
                return False
            size = self._image_size()
            if size is None:
                return False
            x, y = self._to_image(ev.buttonDownScenePos())
            if self._draw_mode:
                if not (0 <= x <= size[0] and 0 <= y <= size[1]):
                    return False  # start drawing on the image only
                self._drag = _Drag("draw", None, "", (x, y), (x, y, 0.0, 0.0), (x, y, 0.0, 0.0))
                self._show_preview(EditorItem("box", -1, self.draw_label, x, y, 0.0, 0.0))
            else:
                hit = self.hit(x, y)
                if hit is None:
                    return False  # pan as before
                key, part = hit
                it = self.item(key)
                assert it is not None
                if key not in self._selected:
                    self.select([key])
                mode = "move" if part == "inside" else "resize"
                self._drag = _Drag(mode, key, part, (x, y), it.rect, it.rect)
            return self._update_drag(ev)
        if self._drag is None:
            return False
        return self._update_drag(ev)

    def _update_drag(self, ev) -> bool:
        d = self._drag
        size = self._image_size()
        if d is None or size is None:
            return False
        x, y = self._to_image(ev.scenePos())
        dx, dy = x - d.start[0], y - d.start[1]
        if d.mode == "draw":
            d.current = span_rect(d.start[0], d.start[1], x, y, *size)
        elif d.mode == "move":
            d.current = move_rect(d.rect, dx, dy, *size)
        else:
            d.current = resize_rect(d.rect, d.part, dx, dy, *size)
        drawn = self._preview if d.mode == "draw" else self._drawn.get(d.key)  # type: ignore[arg-type]
        if drawn is not None:
            drawn.set_rect(d.current)
        if ev.isFinish():
            self._drag = None
            self._finish(d)
        return True

    def _finish(self, d: _Drag) -> None:
        x, y, w, h = d.current
        if d.mode == "draw":
            self.set_draw_mode(False)
            if w < self.MIN_SIZE or h < self.MIN_SIZE:
                self._drop_preview()
                self.refused.emit(f"box not added: {w:.1f} x {h:.1f} px is empty; drag out a box "
                                  "inside the image")
                return
            # the preview stays until the store's answer is drawn (the next redraw drops it)
            self.drawRequested.emit(self.draw_label, x, y, w, h)
            return
        assert d.key is not None
        if d.current == d.rect:
            return
        if w < self.MIN_SIZE or h < self.MIN_SIZE:
            self._drawn[d.key].set_rect(d.rect) if d.key in self._drawn else None
            self.refused.emit("box not changed: it would have no area")
            return
        self.geometryRequested.emit(d.key[0], d.key[1], x, y, w, h)

    def _show_preview(self, item: EditorItem) -> None:
        self._preview = _Drawn(self.layer, item, True)

    def _cancel_drag(self) -> None:
        """Undo the drag in flight, if any (a finished draw's preview waits for the redraw)."""
        d, self._drag = self._drag, None
        if d is None:
            return
        if d.key in self._drawn:
            self._drawn[d.key].set_rect(d.rect)  # type: ignore[index]
        self._drop_preview()

    def _on_click(self, ev) -> None:
        if not self.enabled or ev.button() != Qt.MouseButton.LeftButton or self._draw_mode:
            return
        if self.layer.image_shape is None:
            return
        x, y = self._to_image(ev.scenePos())
        hit = self.hit(x, y)
        toggle = bool(ev.modifiers() & (Qt.KeyboardModifier.ControlModifier
                                        | Qt.KeyboardModifier.ShiftModifier))
        if hit is None:
            if not toggle:
                self.select([])
            return
        key = hit[0]
        if toggle:
            sel = [k for k in self._selected if k != key]
            if key not in self._selected:
                sel.append(key)
            self.select(sel)
        else:
            self.select([key])

    def _on_hover(self, scene_pos: QPointF) -> None:
        if self._drag is not None or not self.enabled or self.layer.image_shape is None:
            return
        vp = self.panel.viewport()
        if self._draw_mode:
            vp.setCursor(Qt.CursorShape.CrossCursor)
            return
        hit = self.hit(*self._to_image(scene_pos)) if self._items else None
        vp.setCursor(_CURSORS[hit[1]] if hit else Qt.CursorShape.ArrowCursor)

