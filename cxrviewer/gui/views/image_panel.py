"""The image panel: one radiograph in a pyqtgraph ViewBox, plus overlay layers.

Coordinates: the image is a row-major ``ImageItem`` at the origin, one unit per
pixel, in a ViewBox with locked aspect and ``invertY`` (y points down, as in
radiology), so view coordinates *are* original-image pixel coordinates
(``x`` = column, ``y`` = row), the same as :class:`~cxrviewer.core.geometry.Box`.

Mouse: wheel = zoom about the cursor; left or middle drag = pan; right drag =
window/level (horizontal = width, vertical = centre; see
:func:`cxrviewer.gui.windowing.drag_window`). With :attr:`ImagePanel.wl_mode`
on, left drag does window/level too (for trackpads). Auto-range is off: the
view changes only on fit/reset/zoom or user interaction, never when levels,
overlays or boxes change. Until the user zooms or pans (:attr:`ImagePanel.auto_fit`), the
panel re-fits the whole image whenever it is resized (layout changes, window resizes).

Extending (explanation panels, box editor)
------------------------------------------
* **Compose layers**: ``panel.add_layer(layer)`` with a
  :class:`~cxrviewer.gui.views.layers.Layer` subclass. Every panel already has
  ``panel.heatmap`` (:class:`HeatmapLayer`, z 10) and ``panel.gt_boxes``
  (:class:`BoxLayer`, z 20); ``panel.heatmap.set_heatmap(cam)`` shows a CAM
  stretched over the image.
* **Subclass**: an ``ExplanationPanel(ImagePanel)`` sets a title
  (``set_title``), adds its layers in ``__init__`` and overrides
  :meth:`on_study_changed` (called after a new image is shown) to request its
  results; nothing else needs to change.
* **Tools**: a drawing tool appends a callable to
  ``panel.view.drag_interceptors`` (gets each pyqtgraph drag event first and
  returns True when it consumed it), e.g. the box editor's "draw box" mode.
* **Link**: ``panel.bind(state)`` follows a :class:`ViewerState` (study,
  window, invert, GT toggle) and pushes W/L drags back to it;
  ``panel.link_view(other)`` shares pan/zoom between panels.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QGraphicsItem

from ...core.study import Study
from .. import windowing as wl
from ..state import ViewerState
from .layers import BoxLayer, HeatmapLayer, Layer

log = logging.getLogger(__name__)

L = TypeVar("L", bound=Layer)

_GREY = np.arange(256, dtype=np.uint8)
_GREY_INVERTED = _GREY[::-1].copy()


class WindowLevelViewBox(pg.ViewBox):
    """A ViewBox whose right drag (or left drag in W/L mode) reports W/L deltas.

    ``drag_interceptors`` get the first look at every drag event (a box-drawing
    tool appends one and returns True for the drags it consumes; pyqtgraph ROIs
    already handle drags on themselves before the ViewBox sees them).
    """

    #: (dx, dy) in screen pixels since the last drag event
    sigWindowDrag = Signal(float, float)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wl_mode = False
        self.drag_interceptors: list[Callable[[object], bool]] = []

    def _is_wl_drag(self, ev) -> bool:
        if ev.button() == Qt.MouseButton.RightButton:
            return True
        return self.wl_mode and ev.button() == Qt.MouseButton.LeftButton

    def mouseDragEvent(self, ev, axis=None) -> None:  # noqa: N802 - Qt naming
        for intercept in list(self.drag_interceptors):
            if intercept(ev):
                ev.accept()
                return
        if self._is_wl_drag(ev):
            ev.accept()
            d = ev.screenPos() - ev.lastScreenPos()
            if d.x() or d.y():
                self.sigWindowDrag.emit(float(d.x()), float(d.y()))
            return
        super().mouseDragEvent(ev, axis)


class TitleItem(pg.LabelItem):
    """A panel title whose text never sets a minimum width (pyqtgraph's LabelItem does, and a
    too-wide title widens the panel's whole layout past the panel: the view gets cut off)."""

    def updateMin(self) -> None:  # noqa: N802 - pyqtgraph naming
        bounds = self.itemRect()
        self.setMinimumWidth(0)
        self.setMinimumHeight(bounds.height())
        self._sizeHint = {Qt.SizeHint.MinimumSize: (0, bounds.height()),
                          Qt.SizeHint.PreferredSize: (bounds.width(), bounds.height()),
                          Qt.SizeHint.MaximumSize: (-1, -1), Qt.SizeHint.MinimumDescent: (0, 0)}
        self.updateGeometry()


class ImagePanel(pg.GraphicsLayoutWidget):
    """One image with window/level, inversion, zoom/pan and overlay layers.

    Signals: ``windowDragged(dx, dy)`` (screen pixels; a bound state turns it
    into a new window), ``cursorMoved(x, y, value)`` (image pixel under the
    mouse, value NaN outside), ``viewChanged(zoom)`` (screen px per image px).
    """

    windowDragged = Signal(float, float)
    cursorMoved = Signal(float, float, float)
    viewChanged = Signal(float)

    FIT_PADDING = 0.02
    #: the view shows the whole image and keeps doing so on resize (False once the user zooms/pans)
    auto_fit = True
    _image: np.ndarray | None = None  # (class default: pyqtgraph resizes the view during __init__)

    def __init__(self, parent=None, *, title: str = "") -> None:
        super().__init__(parent)
        self.setBackground("k")
        self.ci.setContentsMargins(0, 0, 0, 0)
        self.ci.setSpacing(0)
        self._title = TitleItem(title, color="#dddddd", size="10pt")
        self.ci.addItem(self._title, row=0, col=0)
        self._title.setVisible(bool(title))
        if not title:
            self._title.setMaximumHeight(0)
        self.view = WindowLevelViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.view.setMouseMode(pg.ViewBox.PanMode)
        self.ci.addItem(self.view, row=1, col=0)
        # No pyqtgraph autoDownsample: it re-averages the full image on every
        # level change (~0.4 s for a 2k x 2k float image). A cached mean pyramid
        # (see _update_level) keeps W/L drags at a few ms and avoids aliasing.
        self.image_item = pg.ImageItem(axisOrder="row-major", autoDownsample=False)
        self.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        self.image_item.setZValue(0)
        # the radiograph is drawn once per zoom/window change and blitted from a cache after
        # that: a box drawn or moved over it repaints in ~3 ms, not ~7
        # (benchmarks/box_editor_stall.py)
        self.image_item.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        self.view.addItem(self.image_item)
        self.view.disableAutoRange()
        self.view.sigWindowDrag.connect(self.windowDragged)
        self.view.sigRangeChanged.connect(self._on_range_changed)
        self.view.sigRangeChangedManually.connect(self._leave_fit)
        self.scene().sigMouseMoved.connect(self._on_mouse_moved)

        self.study: Study | None = None
        self._image: np.ndarray | None = None
        self._pyramid: list[np.ndarray] = []  # [full, /2, /4, ...] 2x2-mean levels, built lazily
        self._level = -1  # pyramid level on screen
        #: image pixels -> view units (a panel showing a smaller copy of the study, e.g. the
        #: aligned image, sets the ratio so linked panels share original-pixel coordinates)
        self.display_scale = 1.0
        self._window: wl.Window = (0.5, 1.0)
        self._invert = False
        self._state: ViewerState | None = None
        self.layers: dict[str, Layer] = {}
        self._linked: list[ImagePanel] = []
        self.heatmap: HeatmapLayer = self.add_layer(HeatmapLayer("heatmap"))
        self.gt_boxes: BoxLayer = self.add_layer(BoxLayer("gt"))

    # ---- layers ---------------------------------------------------------
    def add_layer(self, layer: L) -> L:
        """Attach ``layer`` to this panel (replacing one of the same name)."""
        old = self.layers.pop(layer.name, None)
        if old is not None:
            old.detach()
        layer.attach(self.view)
        layer.on_image_changed(self.image_shape)
        self.layers[layer.name] = layer
        return layer

    def remove_layer(self, name: str) -> None:
        layer = self.layers.pop(name, None)
        if layer is not None:
            layer.detach()

    # ---- title ----------------------------------------------------------
    def set_title(self, text: str) -> None:
        if text == self._title.text and self._title.isVisible() == bool(text):
            return  # setHtml is ~1 ms: skip no-op updates (grids re-title often)
        self._title.setText(text)
        self._title.setVisible(bool(text))
        self._title.setMaximumHeight(16777215 if text else 0)

    # ---- image ----------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int] | None:
        return None if self._image is None else (int(self._image.shape[0]), int(self._image.shape[1]))

    def set_study(self, study: Study | None, *, reset_view: bool = True,
                  pyramid: list[np.ndarray] | None = None) -> None:
        """Show a study's modality pixels with its header window and invert.

        ``pyramid``: a list shared by panels showing the same study (see set_image).
        """
        self.study = study
        if study is None:
            self.set_image(None)
        else:
            self._window = (float(study.window[0]), max(float(study.window[1]), 1e-6))
            self._invert = bool(study.invert_display)
            self.set_image(study.modality, reset_view=reset_view, pyramid=pyramid)
            self.gt_boxes.set_boxes(study.gt_boxes)
        self.on_study_changed(study)

    def on_study_changed(self, study: Study | None) -> None:
        """Hook for subclasses: called after a new study is shown."""

    def set_image(self, image: np.ndarray | None, *, reset_view: bool = True,
                  pyramid: list[np.ndarray] | None = None) -> None:
        """Show a 2-D array (modality units) with the panel's current window.

        ``pyramid``: a list ``[image, ...]`` shared with other panels showing the same
        array, so the downsampled levels are computed once for all of them.
        """
        old_shape = self.image_shape
        self._level = -1
        if image is None:
            self._image = None
            self._pyramid = []
            self.image_item.clear()
        else:
            self._image = np.asarray(image)
            if pyramid is not None and pyramid and pyramid[0] is image:
                self._pyramid = pyramid
            else:
                self._pyramid = [self._image]
        for layer in self.layers.values():
            layer.on_image_changed(self.image_shape)
        if image is not None:
            if reset_view or self.image_shape != old_shape:
                self.fit()
            self._update_level()

    # ---- display pyramid ----------------------------------------------------
    MAX_LEVEL = 4

    def _pyramid_level(self, k: int) -> np.ndarray:
        while len(self._pyramid) <= k:
            a = self._pyramid[-1]
            h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
            half = a[:h, :w].astype(np.float32, copy=False).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            self._pyramid.append(half)
        return self._pyramid[k]

    def wanted_level(self) -> int:
        """Pyramid level for the current zoom: the coarsest still >= 1 pixel per device pixel."""
        if self._image is None:
            return 0
        zoom = self.zoom_level() * float(self.devicePixelRatioF() or 1.0) * self.display_scale
        k = int(math.floor(math.log2(1.0 / zoom))) if zoom > 0 else 0
        k = max(0, min(k, self.MAX_LEVEL))
        while k > 0 and min(self._image.shape[:2]) >> k < 64:
            k -= 1
        return k

    @property
    def display_level(self) -> int:
        """Pyramid level shown (0 = full resolution; k = 2**k-fold mean-downsampled)."""
        return self._level

    def _update_level(self) -> None:
        if self._image is None:
            return
        k = self.wanted_level()
        if k == self._level:
            return
        img = self._pyramid_level(k)
        f = 2 ** k * self.display_scale
        self.image_item.setImage(img, autoLevels=False, levels=wl.levels(self._window),
                                 lut=_GREY_INVERTED if self._invert else _GREY)
        # the downsampled image covers the same image-pixel rectangle
        self.image_item.setRect(QRectF(0, 0, img.shape[1] * f, img.shape[0] * f))
        self._level = k

    # ---- window / level / invert ------------------------------------------
    @property
    def display_window(self) -> wl.Window:
        """Current ``(centre, width)`` (not named ``window``: QWidget.window() exists)."""
        return self._window

    def set_window(self, centre: float, width: float) -> None:
        self._window = (float(centre), max(float(width), 1e-6))
        if self._image is not None:
            self.image_item.setLevels(wl.levels(self._window))

    @property
    def inverted(self) -> bool:
        return self._invert

    def set_invert(self, invert: bool) -> None:
        self._invert = bool(invert)
        if self._image is not None:
            self.image_item.setLookupTable(_GREY_INVERTED if self._invert else _GREY)

    @property
    def wl_mode(self) -> bool:
        return self.view.wl_mode

    def set_wl_mode(self, on: bool) -> None:
        """Left drag does window/level (True) or pans (False)."""
        self.view.wl_mode = bool(on)

    # ---- view -----------------------------------------------------------
    def fit(self) -> None:
        """Fit the whole image in the panel (aspect kept)."""
        shape = self.image_shape
        if shape is None:
            return
        h, w = shape
        s = self.display_scale
        self.auto_fit = True
        self.view.setRange(QRectF(0, 0, w * s, h * s), padding=self.FIT_PADDING)

    def _leave_fit(self, *_args) -> None:
        self.auto_fit = False

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        if self.auto_fit:
            self.fit()

    def zoom(self, factor: float) -> None:
        """Zoom about the view centre (factor > 1 magnifies)."""
        if factor <= 0:
            return
        self.auto_fit = False
        centre = self.view.viewRect().center()
        self.view.scaleBy((1.0 / factor, 1.0 / factor), center=centre)

    def zoom_level(self) -> float:
        """Screen pixels per image pixel (1.0 = 100 %)."""
        px = self.view.viewPixelSize()[0]
        return 1.0 / px if px and math.isfinite(px) and px > 0 else 1.0

    _syncing = False  # class-wide: one view copy at a time, no ping-pong

    def link_view(self, other: "ImagePanel") -> None:
        """Share pan/zoom with another panel (both ways).

        The view rectangle is copied on every range change. (pyqtgraph's own
        setXLink/setYLink made PySide6 6.12 crash at interpreter exit after a
        linked view was resized, so it is not used.)
        """
        if other is self or other in self._linked:
            return
        for a, b in ((self, other), (other, self)):
            if not a._linked:
                a.view.sigRangeChanged.connect(a._push_linked)  # bound method, no lambda
            a._linked.append(b)
        self._copy_range(other, self)

    @staticmethod
    def _copy_range(src: "ImagePanel", dst: "ImagePanel") -> None:
        if ImagePanel._syncing:
            return
        ImagePanel._syncing = True
        try:
            dst.view.setRange(src.view.viewRect(), padding=0.0)
        finally:
            ImagePanel._syncing = False

    def _push_linked(self, *_args) -> None:
        for other in list(self._linked):
            self._copy_range(self, other)

    def _on_range_changed(self, *_args) -> None:
        self._update_level()
        self.viewChanged.emit(self.zoom_level())

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        if self._image is None:
            return
        p = self.view.mapSceneToView(scene_pos)
        x, y = p.x(), p.y()
        col, row = int(math.floor(x / self.display_scale)), int(math.floor(y / self.display_scale))
        h, w = self._image.shape[:2]
        value = float(self._image[row, col]) if 0 <= row < h and 0 <= col < w else float("nan")
        self.cursorMoved.emit(x, y, value)

    # ---- state binding --------------------------------------------------
    def bind(self, state: ViewerState) -> None:
        """Follow ``state`` (study, window, invert, GT toggle); drags update it."""
        self._state = state
        state.studyChanged.connect(self.set_study)
        state.windowChanged.connect(self.set_window)
        state.invertChanged.connect(self.set_invert)
        state.gtVisibleChanged.connect(self.gt_boxes.set_visible)
        self.windowDragged.connect(state.drag_window)
        self.gt_boxes.set_visible(state.gt_visible)
        if state.study is not None:
            self.set_study(state.study)
            self.set_window(*state.window)
            self.set_invert(state.invert)
