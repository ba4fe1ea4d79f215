"""Explanation panels: one :class:`ImagePanel` per map of a pipeline ``Results``.

Each panel knows which part of the results it shows (its ``PanelSpec`` in the explainer
registry, cxrviewer/core/explain/registry.py), pulls
the map for the selected class with :func:`panel_content` (pure numpy, no Qt,
unit-tested) and draws it with cheap layers: a colour-mapped ``ImageItem``
stretched over the image (:class:`MapLayer`, maps are at most 256 px), an RGBA
overlay for outlines and masks (:class:`RGBALayer`), dashed proposal boxes (View > Show
proposals: the selected class's best three, their score labelled as what it is) and IoU
labels. All coordinates are original-image pixels, so panels link.

Colour scale: maps keep raw values; :func:`scale_group` says which panels share
one range (see :class:`~cxrviewer.gui.views.panel_grid.PanelGrid`); every panel with a map
carries its own colour bar (:class:`~cxrviewer.gui.widgets.colorbar.ColorBarItem`: quantity,
the levels it draws, its colour map) under its image.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QFont, QFontMetricsF

from ...core.display import DisplayData
from ...core.geometry import Box
from ...core.panels import (BelowPrior, class_panel, panel_data, panel_list, panel_ref, prior_boxes, split_below_prior,
                             wrap_caption)
from ...core.proposals import score_text, select_proposals
from ...core.render import outline_rgba, segmentation_rgba
from .. import windowing as wl
from ..widgets.colorbar import ColorBarItem
from .image_panel import ImagePanel
from .layers import BoxLayer, Layer, PriorLayer, Rect, label_color, layout_text_items

log = logging.getLogger(__name__)

ORIGINAL = "original"  # the grid's main panel: the study with the classifier's CAM

SCALE_SHARED = "shared"  # one range over every heat panel
SCALE_QUANTITY = "quantity"  # one range per quantity (CAM/AM together, Grad-CAM, contrast, psi)
SCALE_PANEL = "panel"  # each panel its own min..max
SCALE_MODES = {SCALE_QUANTITY: "Shared per quantity", SCALE_SHARED: "Shared (all panels)",
               SCALE_PANEL: "Per panel"}


def panel_keys() -> list[str]:
    """Every registered panel key in grid order (read from the explainer registry)."""
    return [r.key for r in panel_list()]


def scale_group(key: str, mode: str) -> str:
    """The colour-scale group of panel ``key`` under ``mode``."""
    spec = panel_ref(key).spec
    if spec.fixed_range is not None:
        return spec.quantity  # e.g. psi is a probability map: always 0..1
    if mode == SCALE_SHARED:
        return "all"
    if mode == SCALE_PANEL:
        return key
    return spec.quantity


# ---------------------------------------------------------------------------
@dataclass
class PanelContent:
    """What one panel shows for one class (arrays are the results' own, never copied)."""

    heat: np.ndarray | None = None  # raw map, original coordinates at map_shape
    rgba: Any = None  # uint8 [h, w, 4] overlay (outlines, masks), possibly computed lazily
    image: np.ndarray | None = None  # a different base image (aligned, paired normal)
    image_levels: tuple[float, float] = (0.0, 1.0)
    image_pyramid: list | None = None  # display pyramid of ``image`` built off the GUI thread
    valid: np.ndarray | None = None  # bool map: where ``heat`` has data (outside a warped frame: none)
    proposals: tuple[Box, ...] = ()
    proposal_texts: tuple[str, ...] = ()  # each proposal's label: class and what its score is
    prior: tuple[Box, ...] = ()  # the location prior's reference box of the class (View > Show location prior)
    caption: str = ""
    filled: bool = False  # the panel's data has arrived
    #: identity of what is shown: (id of the source array, index) per part; a class slice is a
    #: new view object every time, so the grid compares these keys, never the views
    heat_key: tuple = ()
    rgba_key: tuple = ()
    image_key: tuple = ()
    frame: str = "original"  # "aligned": ``image`` spans the original's extent at its own resolution


class _Lazy:
    """An overlay computed only when a panel actually draws it (``value()``)."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def value(self) -> np.ndarray:
        return self.fn(*self.args)


MAX_PROPOSALS = 3


def proposals_for(res: Any, name: str, limit: int = MAX_PROPOSALS) -> tuple[tuple[Box, ...], tuple[str, ...]]:
    """The ``limit`` best proposals of class ``name`` worth showing
    (:func:`cxrviewer.core.proposals.select_proposals`) and their labels (``"Nodule map 1.94"``,
    ``"Nodule p 0.07"``: the score as what it is)."""
    pairs = select_proposals(res.boxes, classes=(name,), top_k=limit)
    boxes = tuple(b for _src, b in pairs)
    texts = tuple(" ".join(t for t in (b.label, score_text(src, b)) if t) for src, b in pairs)
    return boxes, texts


def panel_content(key: str, res: Any | None, c: int | None, display: DisplayData | None = None, *,
                  below: BelowPrior | None = None, prior: bool = False, proposals: bool = False) -> PanelContent:
    """The data panel ``key`` shows for class index ``c`` (pure numpy; see cxrviewer/core/panels.py);
    ``below``: role -> classes below the location prior; ``prior``: add the class's prior box to a
    panel that shows a map of the class; ``proposals``: the original panel shows the class's best
    proposals."""
    d = panel_data(key, res, c, below)
    if not d.filled:
        return PanelContent(caption=d.caption)
    disp = display or DisplayData()
    ct = PanelContent(heat=d.heat, image=d.image, image_levels=d.image_levels, caption=d.caption, filled=True,
                      heat_key=d.heat_key, image_key=d.image_key, rgba_key=d.overlay_key, frame=d.frame,
                      image_pyramid=disp.pyramids.get(key) if d.image is not None else None)
    if d.outline is not None:
        ct.rgba = _Lazy(outline_rgba, d.outline)
    elif d.masks is not None:
        over = disp.overlays.get(key)
        ct.rgba = over if over is not None and disp.sources.get(key) == id(d.masks) else _Lazy(segmentation_rgba,
                                                                                             d.masks)
    if proposals and key == ORIGINAL and c is not None:
        ct.proposals, ct.proposal_texts = proposals_for(res, res.classes[c])
    if prior and c is not None and d.image is None and class_panel(key):
        ct.prior = prior_boxes(res, (res.classes[c],))
    if ct.heat is not None and panel_ref(key).spec.fixed_range is None:
        valid = disp.valid
        if valid is not None and valid.shape == ct.heat.shape:
            ct.valid = valid
    return ct


def best_ious(gt: Sequence[Box], proposals: Sequence[Box]) -> list[tuple[Box, float]]:
    """Each ground-truth box with its best IoU against the proposals."""
    from ...core.explain.metrics import iou

    return [(g, max((iou(p, g) for p in proposals), default=0.0)) for g in gt]


# ---------------------------------------------------------------------------
class MapLayer(Layer):
    """A raw map drawn through a colour LUT with explicit levels, stretched over the image."""

    z = 10.0

    def __init__(self, name: str = "map") -> None:
        super().__init__(name)
        self.item = pg.ImageItem(axisOrder="row-major")
        self._add(self.item)
        self.item.setVisible(False)
        self.data: np.ndarray | None = None

    def set_map(self, heat: np.ndarray | None, levels: tuple[float, float], lut: np.ndarray,
                opacity: float, valid: np.ndarray | None = None) -> None:
        """Show ``heat`` through ``lut`` at ``levels``; outside ``valid`` (if given) is transparent."""
        self.data = heat
        if heat is None:
            self.item.clear()
            self.item.setVisible(False)
            return
        lo, hi = levels
        if not hi > lo:
            hi = lo + 1e-6
        shown = np.asarray(heat, np.float32)
        if valid is not None:
            shown = np.where(valid, shown, np.float32(np.nan))
        self.item.setImage(shown, autoLevels=False, levels=(lo, hi), lut=lut)
        self.item.setOpacity(opacity)
        self._fit()
        self.item.setVisible(self._visible)

    def set_style(self, levels: tuple[float, float] | None = None, lut: np.ndarray | None = None,
                  opacity: float | None = None) -> None:
        if self.data is None:
            return
        if levels is not None:
            lo, hi = levels
            self.item.setLevels((lo, hi if hi > lo else lo + 1e-6))
        if lut is not None:
            self.item.setLookupTable(lut)
        if opacity is not None:
            self.item.setOpacity(opacity)

    def _fit(self) -> None:
        if self.data is not None and self.image_shape:
            h, w = self.image_shape
            self.item.setRect(QRectF(0, 0, float(w), float(h)))

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.set_map(None, (0, 1), np.zeros((2, 3), np.uint8), 1.0)

    def set_visible(self, visible: bool) -> None:
        self._visible = bool(visible)
        self.item.setVisible(self._visible and self.data is not None)


class RGBALayer(MapLayer):
    """An RGBA uint8 overlay (outlines, segmentation) stretched over the image."""

    z = 15.0

    def set_rgba(self, rgba: np.ndarray | None) -> None:
        self.data = rgba
        if rgba is None:
            self.item.clear()
            self.item.setVisible(False)
            return
        self.item.setImage(rgba, autoLevels=False, levels=(0, 255))
        self._fit()
        self.item.setVisible(self._visible)

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        Layer.on_image_changed(self, shape)
        self.set_rgba(None)


class IoULayer(Layer):
    """'IoU 0.42' beside each ground-truth box that has proposals of its class, placed where it
    covers no box label (``taken``: the other layers' label rects; redone when the zoom changes)."""

    z = 21.0

    def __init__(self, name: str, taken: Callable[[], Sequence[Rect]]) -> None:
        super().__init__(name)
        self._taken = taken
        self._entries: list[tuple[pg.TextItem, Rect]] = []

    def attach(self, view: pg.ViewBox) -> None:
        super().attach(view)
        view.sigTransformChanged.connect(self.relayout)

    def set_ious(self, pairs: Sequence[tuple[Box, float]]) -> None:
        self.clear()
        for box, value in pairs:
            label = pg.TextItem(f"IoU {value:.2f}", color=label_color(box.label), anchor=(0, 0),
                                fill=pg.mkBrush(0, 0, 0, 170))
            self._add(label)
            self._entries.append((label, (box.x, box.y, box.w, box.h)))
        self.relayout()

    def relayout(self, *_args: object) -> None:
        """Place the labels for the current zoom, clear of the box labels."""
        shape = self.image_shape
        bounds = None if shape is None else (0.0, 0.0, float(shape[1]), float(shape[0]))
        layout_text_items(self.view, self._entries, taken=list(self._taken()), bounds=bounds)

    def clear(self) -> None:
        super().clear()
        self._entries = []

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.clear()


#: colour of the "below the location prior" line of a panel title
BELOW_PRIOR_COLOUR = "#f0b050"


#: a panel title wraps to at most this many lines; the rest is elided (full text in the tooltip)
TITLE_LINES = 3


def title_html(caption: str, fits, elide=None) -> str:
    """A panel title as HTML lines that ``fits`` accepts (:func:`wrap_caption`), at most
    :data:`TITLE_LINES` (the last one ``elide``d); the ``· below the location prior`` mark on a
    line of its own, in amber."""
    main, mark = split_below_prior(caption)
    wrapped = wrap_caption(main, fits) if main else []
    if len(wrapped) > TITLE_LINES and elide is not None:
        wrapped = wrapped[:TITLE_LINES - 1] + [elide(" ".join(wrapped[TITLE_LINES - 1:]))]
    lines = [html.escape(t) for t in wrapped]
    if mark:
        lines += [f"<span style='color:{BELOW_PRIOR_COLOUR}'>{html.escape(t)}</span>" for t in wrap_caption(mark, fits)]
    return "<br>".join(lines)


class ExplanationPanel(ImagePanel):
    """One panel of the grid: base image + map + overlay + boxes (see module docstring).

    Signals: ``viewManuallyChanged(key)`` (user zoom/pan), ``clicked(key)``.
    """

    viewManuallyChanged = Signal(str)
    clicked = Signal(str)
    windowDraggedBy = Signal(str, float, float)

    def __init__(self, key: str, parent=None) -> None:
        self.spec = panel_ref(key).spec
        super().__init__(parent, title=self.spec.title)
        self.key = key
        self.map = self.add_layer(MapLayer("map"))
        self.overlay = self.add_layer(RGBALayer("overlay"))
        # under the ground truth, labels clear of its labels
        self.proposals = self.add_layer(BoxLayer("proposals", dashed=True, avoid=self.gt_boxes))
        self.prior = self.add_layer(PriorLayer("prior"))
        self.ious = self.add_layer(IoULayer("iou", lambda: [*self.gt_boxes.label_rects,
                                                             *self.proposals.label_rects]))
        self.heatmap.set_visible(False)  # the base class's layer is unused here
        self.content = PanelContent()
        self.map_levels: tuple[float, float] | None = None  # colour range the map is drawn with
        self._drag_range: tuple[np.ndarray, Any] | None = None  # (image, its W/L data range)
        self.own_image = False  # showing its own base image (aligned / paired normal)
        self.own_window = False  # W/L not linked (aligned, paired normal)
        self.bar = ColorBarItem()  # the map's colour bar, under the image (collapsed without a map)
        self.ci.addItem(self.bar, row=2, col=0)
        self.setMinimumSize(24, 24)  # never widen the window: 1xN puts every panel in one row
        self._caption = self.spec.title
        self._title.item.document().setDocumentMargin(1.0)  # titles wrap to the panel: keep the width for text
        self.view.sigRangeChangedManually.connect(self._on_manual_range)
        self.windowDragged.connect(self._on_window_drag)
        self.scene().sigMouseClicked.connect(self._on_click)

    # ---- title: wrapped to the panel's width, never clipped -----------------------
    @property
    def caption(self) -> str:
        """The full caption (the title shows it wrapped)."""
        return self._caption

    def set_title(self, text: str) -> None:
        self._caption = text
        self.setToolTip(text)
        font = QFont(self._title.item.font())
        font.setPointSizeF(10.0)
        metrics = QFontMetricsF(font)
        width = max(30.0, self.width() - 4.0)  # 1 px document margin each side, 1 px slack
        super().set_title(title_html(text, lambda t: metrics.horizontalAdvance(t) <= width,
                                     lambda t: metrics.elidedText(t, Qt.TextElideMode.ElideRight, width))
                          if text else "")

    def set_scale(self, label: str, levels: tuple[float, float] | None, cmap: str) -> None:
        """The colour bar: ``label`` and the ``levels`` the map is drawn with (None: no map, no bar)."""
        if levels is None or self.content.heat is None:
            self.bar.set_shown(False)
        else:
            self.bar.set_scale(label, levels[0], levels[1], cmap)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        if hasattr(self, "_caption"):
            self.set_title(self._caption)

    def _on_manual_range(self, _mask) -> None:
        self.viewManuallyChanged.emit(self.key)

    def _on_window_drag(self, dx: float, dy: float) -> None:
        self.windowDraggedBy.emit(self.key, dx, dy)

    def _on_click(self, _event) -> None:
        self.clicked.emit(self.key)

    def drag_own_window(self, dx: float, dy: float) -> None:
        """Window/level drag on this panel's image alone (data percentiles once per image)."""
        if self._image is None:
            return
        if self._drag_range is None or self._drag_range[0] is not self._image:
            self._drag_range = (self._image, wl.data_range(self._image))
        c, w = wl.drag_window(self.display_window, dx, dy, self._drag_range[1], display_inverted=self.inverted)
        self.set_window(c, w)

    @property
    def filled(self) -> bool:
        """True when the panel shows its map/image for the current results."""
        return self.content.filled

    def has_image(self) -> bool:
        return self._image is not None

    def show_content(self, content: PanelContent, *, study: Any, levels: tuple[float, float] | None,
                     lut: np.ndarray, opacity: float, gt_visible: bool, pyramid: list | None) -> None:
        """Draw ``content`` (called by the grid when the data or the class changed)."""
        old = self.content
        self.content = content
        self.set_title(content.caption)
        reset = False
        if content.image is not None:
            if old.image_key != content.image_key or not self.own_image:
                reset = True
                self.own_image = True
                self.own_window = True
                img = content.image
                if study is not None and content.frame == "aligned":
                    self.display_scale = study.shape[1] / float(img.shape[1])
                else:
                    self.display_scale = 1.0
                self.set_image(img, reset_view=True, pyramid=content.image_pyramid)
                lo, hi = content.image_levels
                self.set_window((lo + hi) / 2.0, hi - lo)
        elif self.own_image or (study is not None and self.study is not study):
            reset = True
            self.own_image = False
            self.own_window = False
            self.display_scale = 1.0
            self.set_study(study, pyramid=pyramid)
        if reset or content.heat_key != old.heat_key or levels is not None:
            self.map.set_map(content.heat, levels or (0.0, 1.0), lut, opacity, content.valid)
        if reset or content.rgba_key != old.rgba_key:
            rgba = content.rgba.value() if isinstance(content.rgba, _Lazy) else content.rgba
            self.overlay.set_rgba(rgba)
        if reset or content.proposals != old.proposals or content.proposal_texts != old.proposal_texts:
            self.proposals.set_boxes(content.proposals, texts=content.proposal_texts)
        if reset or content.prior != old.prior:
            self.prior.set_boxes(content.prior)
        gt = [b for b in (study.gt_boxes if study is not None else [])]
        if self.key == ORIGINAL and content.proposals and gt:
            names = {b.label for b in content.proposals}
            self.ious.set_ious(best_ious([g for g in gt if g.label in names], content.proposals))
        else:
            self.ious.clear()
        self.ious.set_visible(gt_visible)

    def reset_content(self) -> None:
        self.content = PanelContent()
        self.set_title(self.spec.title)
        self.bar.set_shown(False)
