"""Explanation panels: one :class:`ImagePanel` per map of a pipeline ``Results``.

Each panel knows which part of the results it shows (:data:`PANEL_SPECS`), pulls
the map for the selected class with :func:`panel_content` (pure numpy, no Qt,
unit-tested) and draws it with cheap layers: a colour-mapped ``ImageItem``
stretched over the image (:class:`MapLayer`, maps are at most 256 px), an RGBA
overlay for outlines and masks (:class:`RGBALayer`), dashed proposal boxes and
IoU labels. All coordinates are original-image pixels, so panels link.

Colour scale: maps keep raw values; :func:`scale_group` says which panels share
one range (see :class:`~cxrviewer.gui.views.panel_grid.PanelGrid`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Signal

from ...core.geometry import Box
from ...core.render import SEGMENTATION_COLOURS
from .image_panel import ImagePanel
from .layers import BoxLayer, Layer, label_color

log = logging.getLogger(__name__)

AM_STEPS = 3  # panels for attention-mining steps t = 1..T (the pipeline's default T)


@dataclass(frozen=True)
class PanelSpec:
    key: str
    title: str
    quantity: str  # colour-scale group: activation | gradcam | contrast | probability | none


PANEL_SPECS: tuple[PanelSpec, ...] = (
    PanelSpec("original", "Original + CAM", "activation"),
    PanelSpec("aligned", "Aligned", "none"),
    *(PanelSpec(f"am{t}", f"Attention mining t={t}", "activation") for t in range(1, AM_STEPS + 1)),
    PanelSpec("am_final", "Attention mining final", "am_final"),  # H_f is normalised (AM Eq. 8)
    PanelSpec("contrast", "Contrast attention dM", "contrast"),
    PanelSpec("normal", "Paired normal", "none"),
    PanelSpec("disease_mask", "Disease mask", "probability"),
    PanelSpec("lung_heart", "Lung / heart", "none"),
    PanelSpec("gradcam", "Grad-CAM", "gradcam"),
)
SPEC_BY_KEY = {s.key: s for s in PANEL_SPECS}

SCALE_SHARED = "shared"  # one range over every heat panel
SCALE_QUANTITY = "quantity"  # one range per quantity (CAM/AM together, Grad-CAM, contrast, psi)
SCALE_PANEL = "panel"  # each panel its own min..max
SCALE_MODES = {SCALE_QUANTITY: "Shared per quantity", SCALE_SHARED: "Shared (all panels)",
               SCALE_PANEL: "Per panel"}


def scale_group(key: str, mode: str) -> str:
    """The colour-scale group of panel ``key`` under ``mode``."""
    q = SPEC_BY_KEY[key].quantity
    if q == "probability":
        return "probability"  # psi is a probability map: always 0..1
    if mode == SCALE_SHARED:
        return "all"
    if mode == SCALE_PANEL:
        return key
    return q


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
    caption: str = ""
    filled: bool = False  # the panel's data has arrived
    #: identity of what is shown: (id of the source array, index) per part; ``res.cam[c]`` is a
    #: new view object every time, so the grid compares these keys, never the views
    heat_key: tuple = ()
    rgba_key: tuple = ()
    image_key: tuple = ()


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (mask minus its 4-neighbour erosion)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2 or not m.any():
        return np.zeros(m.shape, bool)
    e = m.copy()
    e[1:, :] &= m[:-1, :]
    e[:-1, :] &= m[1:, :]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return m & ~e


def outline_rgba(mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 255)) -> np.ndarray:
    edge = outline(mask)
    out = np.zeros((*edge.shape, 4), np.uint8)
    out[edge] = (*colour, 255)
    return out


def segmentation_rgba(masks: np.ndarray) -> np.ndarray:
    """Translucent fill + opaque outline for left lung, right lung, heart."""
    masks = np.asarray(masks)
    out = np.zeros((*masks.shape[1:], 4), np.uint8)
    for k in range(min(3, masks.shape[0])):
        m = masks[k].astype(bool)
        col = SEGMENTATION_COLOURS[k]
        out[m] = (*col, 80)
        out[outline(m)] = (*col, 255)
    return out


class _Lazy:
    """An overlay computed only when a panel actually draws it (``value()``)."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def value(self) -> np.ndarray:
        return self.fn(*self.args)


def _prob(res: Any, c: int) -> str:
    return f" p={res.probabilities[c]:.2f}" if res.probabilities is not None and c < len(res.probabilities) else ""


MAX_PROPOSALS = 3


def proposals_for(res: Any, name: str, limit: int = MAX_PROPOSALS) -> tuple[Box, ...]:
    """Proposed boxes for a class (the ``limit`` best): attention-mining boxes, else CAM, else CIA."""
    for src in ("am", "cam", "cia"):
        boxes = [b for b in res.boxes.get(src, []) if b.label == name]
        if boxes:
            boxes.sort(key=lambda b: -(b.score if b.score is not None else 0.0))
            return tuple(boxes[:limit])
    return ()


def panel_content(key: str, res: Any | None, c: int | None) -> PanelContent:
    """The data panel ``key`` shows for class index ``c`` (pure numpy)."""
    spec = SPEC_BY_KEY[key]
    if res is None:
        return PanelContent(caption=spec.title)
    if c is None or not res.classes:  # no classifier: only the class-free panels have data
        if key in ("aligned", "normal", "lung_heart", "contrast"):
            c = 0
        else:
            return PanelContent(caption=spec.title + ("" if res.classes else " (no classifier)"))
    name = res.classes[c] if c < len(res.classes) else ""
    p = _prob(res, c)
    ct = _content(key, res, c, name, p)
    if ct.heat is not None and key != "disease_mask":
        valid = getattr(res, "map_valid", None)
        if valid is not None and valid.shape == ct.heat.shape:
            ct.valid = valid
    return ct


def _content(key: str, res: Any, c: int, name: str, p: str) -> PanelContent:
    spec = SPEC_BY_KEY[key]
    if key == "original":
        if res.cam is None:
            return PanelContent(caption=f"Original ({name}{p})" if p else "Original")
        return PanelContent(heat=res.cam[c], proposals=proposals_for(res, name),
                            caption=f"CAM · {name}{p}", filled=True, heat_key=(id(res.cam), c))
    if key == "aligned":
        if res.aligned_image is None:
            return PanelContent(caption="Aligned (no alignment model)")
        return PanelContent(image=res.aligned_image, caption="Aligned to the canonical chest", filled=True,
                            image_key=(id(res.aligned_image),),
                            image_pyramid=getattr(res, "aligned_pyramid", None))
    if key.startswith("am") and key[2:].isdigit():
        t = int(key[2:])
        steps = res.am_steps.get(name)
        if steps is None or t > steps.shape[0]:
            why = "" if res.am_final is not None or res.cam is None else " (no AM)"
            return PanelContent(caption=f"AM t={t} · {name}{why}")
        erased = res.am_erased.get(name)
        has_erased = erased is not None and t - 1 < erased.shape[0] and t > 1
        return PanelContent(heat=steps[t - 1], rgba=_Lazy(outline_rgba, erased[t - 1]) if has_erased else None,
                            caption=f"AM t={t} · {name}" + (" (erased outlined)" if has_erased else ""),
                            filled=True, heat_key=(id(steps), t), rgba_key=(id(erased), t) if has_erased else ())
    if key == "am_final":
        if res.am_final is None:
            return PanelContent(caption="AM final")
        return PanelContent(heat=res.am_final[c], caption=f"AM final H_f · {name}{p}", filled=True,
                            heat_key=(id(res.am_final), c))
    if key == "contrast":
        if res.contrast is None:
            return PanelContent(caption="Contrast attention (no CIA model)")
        extra = ""
        if res.cia_grid_raw is not None and name in res.cia_classes:
            extra = f" · {name} grid max p={float(res.cia_grid_raw[res.cia_classes.index(name)].max()):.2f}"
        return PanelContent(heat=res.contrast, caption=f"Contrast dM{extra}", filled=True,
                            heat_key=(id(res.contrast),))
    if key == "normal":
        if res.paired_normal is None:
            return PanelContent(caption="Paired normal (no CIA model)")
        return PanelContent(image=res.paired_normal, image_levels=(0.0, 255.0),
                            caption=f"Paired normal {res.paired_normal_id or ''}".strip(), filled=True,
                            image_key=(id(res.paired_normal),),
                            image_pyramid=getattr(res, "paired_pyramid", None))
    if key == "disease_mask":
        dm = res.disease_mask
        if dm is None or c >= dm.shape[0]:
            return PanelContent(caption="Disease mask")
        return PanelContent(heat=dm[c], caption=f"Disease mask ψ ({res.disease_mask_source}) · {name}", filled=True,
                            heat_key=(id(dm), c))
    if key == "lung_heart":
        if res.segmentation is None:
            return PanelContent(caption="Lung / heart (no segmentation model)")
        over = getattr(res, "segmentation_overlay", None)  # (masks, rgba) made by the worker
        rgba = over[1] if over is not None and over[0] is res.segmentation else _Lazy(segmentation_rgba,
                                                                                      res.segmentation)
        return PanelContent(rgba=rgba,
                            caption="Lung / heart: L red, R green, heart blue", filled=True,
                            rgba_key=(id(res.segmentation),))
    if key == "gradcam":
        if res.gradcam is None:
            return PanelContent(caption="Grad-CAM")
        return PanelContent(heat=res.gradcam[c], caption=f"Grad-CAM · {name}{p}", filled=True,
                            heat_key=(id(res.gradcam), c))
    return PanelContent(caption=spec.title)


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
    """'IoU 0.42' under each ground-truth box that has proposals of its class."""

    z = 21.0

    def set_ious(self, pairs: Sequence[tuple[Box, float]]) -> None:
        self.clear()
        for box, value in pairs:
            label = pg.TextItem(f"IoU {value:.2f}", color=label_color(box.label), anchor=(0, 0),
                                fill=pg.mkBrush(0, 0, 0, 170))
            label.setPos(box.x, box.y + box.h)
            self._add(label)

    def on_image_changed(self, shape: tuple[int, int] | None) -> None:
        super().on_image_changed(shape)
        self.clear()


class ExplanationPanel(ImagePanel):
    """One panel of the grid: base image + map + overlay + boxes (see module docstring).

    Signals: ``viewManuallyChanged(key)`` (user zoom/pan), ``clicked(key)``.
    """

    viewManuallyChanged = Signal(str)
    clicked = Signal(str)
    windowDraggedBy = Signal(str, float, float)

    def __init__(self, key: str, parent=None) -> None:
        super().__init__(parent, title=SPEC_BY_KEY[key].title)
        self.key = key
        self.spec = SPEC_BY_KEY[key]
        self.map = self.add_layer(MapLayer("map"))
        self.overlay = self.add_layer(RGBALayer("overlay"))
        self.proposals = self.add_layer(BoxLayer("proposals", dashed=True))
        self.ious = self.add_layer(IoULayer("iou"))
        self.heatmap.set_visible(False)  # the base class's layer is unused here
        self.content = PanelContent()
        self.own_image = False  # showing its own base image (aligned / paired normal)
        self.own_window = False  # W/L not linked (aligned, paired normal)
        self.setMinimumSize(120, 120)
        self.view.sigRangeChangedManually.connect(self._on_manual_range)
        self.windowDragged.connect(self._on_window_drag)
        self.scene().sigMouseClicked.connect(self._on_click)

    def _on_manual_range(self, _mask) -> None:
        self.viewManuallyChanged.emit(self.key)

    def _on_window_drag(self, dx: float, dy: float) -> None:
        self.windowDraggedBy.emit(self.key, dx, dy)

    def _on_click(self, _event) -> None:
        self.clicked.emit(self.key)

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
                if study is not None and self.key == "aligned":
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
        if reset or content.proposals != old.proposals:
            self.proposals.set_boxes(content.proposals)
        gt = [b for b in (study.gt_boxes if study is not None else [])]
        if self.key == "original" and content.proposals and gt:
            names = {b.label for b in content.proposals}
            self.ious.set_ious(best_ious([g for g in gt if g.label in names], content.proposals))
        else:
            self.ious.clear()
        self.ious.set_visible(gt_visible)

    def reset_content(self) -> None:
        self.content = PanelContent()
        self.set_title(self.spec.title)
