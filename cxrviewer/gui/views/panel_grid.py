"""The linked panel grid: every explanation of one study side by side.

One :class:`~cxrviewer.gui.views.explain_panels.ExplanationPanel` per panel of the
explainer registry (:func:`cxrviewer.core.panels.panel_list`). The grid, not the panels, follows the :class:`ViewerState`:

* study -> every panel shows it (one shared display pyramid, built once);
* window/level and invert -> every panel showing the study; with ``linked``
  off, a W/L drag in a panel other than the original changes that panel only;
* zoom/pan -> panels are ViewBox-linked to the original (``set_linked``);
  the paired normal (its own image, another patient) is never linked; until the
  user zooms or pans, every panel fits the whole image (on open, layout change,
  resize; F fits again);
* results + class -> :func:`panel_content` per panel, one colour range per
  scale group (:func:`scale_group`), re-drawing only the panels whose arrays
  changed (stage updates arrive several times per study; slots stay cheap);
  each panel's colour bar shows its quantity and the levels it draws;
* the class the user chose stays across studies (by name); before any choice the
  grid follows the top finding.

Layouts (OHIF-like): ``grid`` (all panels), ``1x1`` / ``2x2`` (starting at the
focused panel), ``1xN`` (one row).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from PySide6.QtCore import QRectF, QTimer, Signal
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QGridLayout, QWidget

from ...core.display import DisplayData
from ...core.panels import below_prior_by_role, not_available, not_available_lines, panel_list, panel_ref, scale_label
from ...core.render import DEFAULT_COLORMAP, OPACITY, overlay_lut
from ..state import ViewerState
from .explain_panels import (ORIGINAL, SCALE_QUANTITY, SCALE_SHARED, ExplanationPanel, panel_content, panel_keys,
                             scale_group)

log = logging.getLogger(__name__)

LAYOUTS = ("grid", "1x1", "2x2", "1xN")
UNLINKED = ("normal",)  # never view-linked (another image, another frame)


def finite_range(a: np.ndarray) -> tuple[float, float]:
    """min/max ignoring NaN (0, 1 when nothing is finite)."""
    a = np.asarray(a)
    if a.size == 0:
        return (0.0, 1.0)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return (0.0, 1.0)
    return (lo, hi)


class PanelGrid(QWidget):
    """Explanation panels in a grid; see the module docstring.

    Signals: ``panelsUpdated(int)`` (number of filled panels after an update),
    ``activePanelChanged(str)``.
    """

    panelsUpdated = Signal(int)
    activePanelChanged = Signal(str)

    def __init__(self, state: ViewerState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.order = panel_keys()
        self.panels: dict[str, ExplanationPanel] = {k: ExplanationPanel(k, self) for k in self.order}
        self.original = self.panels[ORIGINAL]
        self.layout_name = "grid"
        self.focus_key = ORIGINAL
        self.active_key = ORIGINAL
        self.linked = True
        self.colormap_name = DEFAULT_COLORMAP
        self.opacity = OPACITY
        self.scale_mode = SCALE_QUANTITY
        self.results: Any = None
        self.display = DisplayData()
        self.class_index: int | None = None
        self.available: set[str] | None = None  # panels the model set can fill (None: unknown)
        #: panel key -> why the model set (and the shown results) cannot fill it (core.panels.not_available)
        self.unavailable: dict[str, str] = {}
        self.hide_unavailable = True
        self.show_prior = False  # the location prior's grey reference box of the shown class
        self.show_proposals = False  # the shown class's best proposals on the original panel (View menu)
        #: bundle folder name -> manifest of the current model set (their cards mark "below the prior")
        self.manifests: dict[str, Any] = {}
        self._class_auto = True  # follow the top finding until the user selects a class
        self._chosen_class = ""  # the class the user selected (kept across studies)
        self.ranges: dict[str, tuple[float, float]] = {}
        self._pyramid: list[np.ndarray] | None = None
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setSpacing(2)
        self._syncing = False
        self._queue: dict[str, tuple] = {}  # panel key -> (draw function, args), in panel order
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._on_timer)
        for p in self.panels.values():
            p.windowDraggedBy.connect(self._on_drag)
            p.viewManuallyChanged.connect(self._sync_from)
            p.clicked.connect(self.set_active)
        self.set_linked(True)
        self.set_layout("grid")
        state.studyChanged.connect(self.set_study)
        state.windowChanged.connect(self._on_window)
        state.invertChanged.connect(self._on_invert)
        state.gtVisibleChanged.connect(self._on_gt_visible)

    # ---- layout -------------------------------------------------------------
    def shown_order(self) -> list[str]:
        """Panels the current model set can fill (all when unknown or ``hide_unavailable`` is off)."""
        if not self.hide_unavailable or self.available is None:
            return list(self.order)
        return [k for k in self.order if k == ORIGINAL or k in self.available]

    def visible_keys(self) -> list[str]:
        order = self.shown_order()
        n = {"1x1": 1, "2x2": 4}.get(self.layout_name)
        if n is None:
            return order
        n = min(n, len(order))
        focus = self.focus_key if self.focus_key in order else order[0]
        i = order.index(focus)
        keys = order[i:i + n]
        return keys + order[:n - len(keys)] if len(keys) < n else keys

    def set_available(self, roles: Any, results: Any = None) -> None:
        """Which panels the model roles (``results.models`` keys) can fill, and why not the others
        (:attr:`unavailable`; with ``results``, also the classes a method has nothing for);
        re-lays out on change."""
        avail = {r.key for r in panel_list(set(roles))} & set(self.order)
        self.unavailable = not_available(set(roles), results)
        if avail != self.available:
            self.available = avail
            self.set_layout(self.layout_name)

    def set_hide_unavailable(self, hide: bool) -> None:
        """Hide the panels the model set cannot fill (True, the default) or show them with the
        reason as their placeholder (False)."""
        self.hide_unavailable = bool(hide)
        self.set_layout(self.layout_name)

    def set_layout(self, name: str) -> None:
        """``grid``, ``1x1``, ``2x2`` or ``1xN``."""
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; layouts are {', '.join(LAYOUTS)}")
        self.layout_name = name
        smooth = name in ("1x1", "2x2")  # big panels: smooth scaling; many small ones: fast paint
        for p in self.panels.values():
            self._grid.removeWidget(p)
            p.hide()
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, smooth)
        keys = self.visible_keys()
        if name == "1xN":
            cols = len(keys)
        elif name == "2x2":
            cols = 2
        elif name == "1x1":
            cols = 1
        else:
            cols = max(1, math.ceil(math.sqrt(len(keys) * 1.3)))
        for r in range(self._grid.rowCount()):
            self._grid.setRowStretch(r, 0)
        for c in range(self._grid.columnCount()):
            self._grid.setColumnStretch(c, 0)
        for i, k in enumerate(keys):
            self._grid.addWidget(self.panels[k], i // cols, i % cols)
            self._grid.setRowStretch(i // cols, 1)
            self._grid.setColumnStretch(i % cols, 1)
            self.panels[k].show()

    def set_focus(self, key: str) -> None:
        """The first panel shown by the 1x1 / 2x2 layouts."""
        if key in self.panels:
            self.focus_key = key
            self.set_layout(self.layout_name)
            self.set_active(key)

    def set_active(self, key: str) -> None:
        if key in self.panels and key != self.active_key:
            self.active_key = key
            self.activePanelChanged.emit(key)

    @property
    def active(self) -> ExplanationPanel:
        return self.panels[self.active_key]

    # ---- linking --------------------------------------------------------------
    def set_linked(self, on: bool) -> None:
        """Link zoom/pan (and W/L) of every panel to the original panel.

        The grid copies the changed panel's view rectangle to the others itself
        (pyqtgraph's setXLink/setYLink crashed PySide6 6.12 at interpreter exit
        when docks resized linked views).
        """
        self.linked = bool(on)
        if self.linked:
            self._sync_from(ORIGINAL)
            c, w = self.state.window
            for p in self.panels.values():
                if not p.own_window and p.has_image():
                    p.set_window(c, w)

    def _sync_from(self, key: str, only: str | None = None) -> None:
        """Copy panel ``key``'s view (centre and zoom) to every linked panel (or just ``only``)."""
        if self._syncing or not self.linked or key in UNLINKED:
            return
        src = self.panels[key]
        if not src.has_image():
            return
        centre = src.view.viewRect().center()
        sx, sy = src.view.viewPixelSize()  # image units per screen pixel: same zoom everywhere
        self._syncing = True
        try:
            for k, p in self.panels.items():
                if k == key or k in UNLINKED or not p.has_image() or only not in (None, k):
                    continue
                if src.auto_fit:  # a fitted source: every panel fits (panels differ in size)
                    p.fit()
                    continue
                box = p.view.boundingRect()
                w, h = box.width() * sx, box.height() * sy
                p.view.setRange(QRectF(centre.x() - w / 2, centre.y() - h / 2, w, h), padding=0.0)
                p.auto_fit = False
        finally:
            self._syncing = False

    def fit_all(self) -> None:
        """Every panel shows its whole image (and keeps doing so on resize)."""
        for p in self.panels.values():
            p.fit()

    def zoom(self, factor: float) -> None:
        """Zoom the active panel (and, linked, every panel) about its centre."""
        self.active.zoom(factor)
        self._sync_from(self.active_key)

    def _on_drag(self, key: str, dx: float, dy: float) -> None:
        p = self.panels[key]
        if p.own_window or not (self.linked or p is self.original):
            p.drag_own_window(dx, dy)
        else:
            self.state.drag_window(dx, dy)

    def _on_window(self, centre: float, width: float) -> None:
        for p in self.panels.values():
            if p.own_window or not p.has_image():
                continue
            if p is self.original or self.linked:
                p.set_window(centre, width)

    def _invert_for(self, p: ExplanationPanel) -> bool:
        """Own images (aligned, paired normal) are model inputs, dense tissue already bright:
        they invert only when the user inverted the study's default display."""
        on = self.state.invert
        if p.own_image:
            study = self.state.study
            return bool(on) != bool(study.invert_display if study is not None else False)
        return bool(on)

    def _on_invert(self, _on: bool) -> None:
        for p in self.panels.values():
            p.set_invert(self._invert_for(p))

    def _on_gt_visible(self, on: bool) -> None:
        for p in self.panels.values():
            p.gt_boxes.set_visible(on)
            p.ious.set_visible(on)

    # ---- study ------------------------------------------------------------------
    def set_study(self, study: Any) -> None:
        """A new study: the original panel shows it now, the others one per event-loop turn."""
        self.results = None
        self.ranges = {}
        self._queue.clear()
        self.display = DisplayData()
        pyr = study.display_pyramid if study is not None else None
        self._pyramid = (pyr if pyr and pyr[0] is study.modality else [study.modality]) if study is not None else None
        for key, p in self.panels.items():
            if p is self.original or study is None:
                self._show_study(p, study)
            else:  # one panel per event-loop turn (title, image, layers reset there too)
                self._queue[key] = (self._show_study, (p, study))
        self._kick()
        self.panelsUpdated.emit(0)

    def _show_study(self, p: ExplanationPanel, study: Any) -> None:
        p.own_image = False
        p.own_window = False
        p.display_scale = 1.0
        p.reset_content()
        p.set_study(study, pyramid=self._pyramid)
        if p is not self.original:
            self._sync_from(ORIGINAL, only=p.key)
        p.gt_boxes.set_visible(self.state.gt_visible)
        if study is not None and (p is self.original or self.linked) and not p.own_window:
            p.set_window(*self.state.window)
        p.set_invert(self._invert_for(p))

    # ---- deferred drawing: one panel per event-loop turn, so the GUI never stalls ----------
    @property
    def pending(self) -> bool:
        """Panels still waiting to be drawn."""
        return bool(self._queue)

    def flush(self) -> None:
        """Draw every queued panel now (exports, tests)."""
        while self._queue:
            self._drain_one()

    def _kick(self) -> None:
        if self._queue and not self._timer.isActive():
            self._timer.start(0)

    def _drain_one(self) -> None:
        if not self._queue:
            return
        key = next(iter(self._queue))
        fn, args = self._queue.pop(key)
        fn(*args)
        self.panelsUpdated.emit(len(self.filled_keys()))

    def _on_timer(self) -> None:
        self._drain_one()
        self._kick()

    # ---- results ------------------------------------------------------------------
    def set_results(self, results: Any, class_index: int | None = None, display: DisplayData | None = None) -> None:
        """Show (partial or complete) results with their display data (built off the GUI thread);
        ``class_index`` None keeps the current class."""
        self.results = results
        self.display = display or DisplayData()
        if results is not None and results.models:
            self.set_available(results.models, results)
            self.setToolTip(self.unavailable_text())
        if class_index is not None:
            self._choose(class_index, results)
        elif not self._class_auto and results is not None and self._chosen_class in results.classes:
            self.class_index = results.classes.index(self._chosen_class)  # the user's class, in this model set
        if (self._class_auto or self.class_index is None
                or (results is not None and self.class_index >= len(results.classes))):
            # until the user picks a class: the most probable one (once probabilities arrive)
            top = results.top_classes(1) if results is not None else []
            self.class_index = top[0] if top else (0 if results is not None and results.classes else None)
        self.refresh()

    def unavailable_text(self) -> str:
        """``Not available with these models:`` and one ``Panel: reason`` line each ('' : none)."""
        lines = not_available_lines((), found=self.unavailable)
        return "Not available with these models:\n" + "\n".join(lines) if lines else ""

    def set_class(self, class_index: int) -> None:
        """The user's class: shown now and kept for the next studies."""
        self._choose(class_index, self.results)
        self.refresh()

    def _choose(self, class_index: int, results: Any) -> None:
        self.class_index = int(class_index)
        self._class_auto = False
        if results is not None and 0 <= self.class_index < len(results.classes):
            self._chosen_class = results.classes[self.class_index]

    @property
    def class_name(self) -> str:
        r = self.results
        if r is None or self.class_index is None or self.class_index >= len(r.classes):
            return ""
        return r.classes[self.class_index]

    def refresh(self) -> None:
        """Recompute panel contents and colour ranges; redraw what changed."""
        res, c = self.results, self.class_index
        study = self.state.study
        below = below_prior_by_role(res, self.manifests) if res is not None else None
        contents = {k: panel_content(k, res, c, self.display, below=below, prior=self.show_prior,
                                     proposals=self.show_proposals) for k in self.order}
        ranges: dict[str, tuple[float, float]] = {}
        for k, ct in contents.items():
            if ct.heat is None:
                continue
            g = scale_group(k, self.scale_mode)
            fixed = panel_ref(k).spec.fixed_range
            lo, hi = fixed if fixed is not None else finite_range(
                ct.heat if ct.valid is None or not ct.valid.any() else ct.heat[ct.valid])
            if g in ranges:
                lo, hi = min(lo, ranges[g][0]), max(hi, ranges[g][1])
            ranges[g] = (lo, hi)
        lut = overlay_lut(self.colormap_name)
        for k in self.order:
            p, ct = self.panels[k], contents[k]
            levels = ranges.get(scale_group(k, self.scale_mode)) if ct.heat is not None else None
            old = p.content
            changed = (ct.heat_key != old.heat_key or ct.rgba_key != old.rgba_key
                       or ct.image_key != old.image_key or ct.proposals != old.proposals
                       or ct.proposal_texts != old.proposal_texts
                       or ct.prior != old.prior or ct.caption != old.caption)
            queued = self._queue.get(k)
            if changed or (queued is not None and queued[0] == self._show_study):
                # drawn later (one panel per turn); replaces an older queued draw of this panel
                self._queue[k] = (self._draw, (p, ct, study, levels, lut))
            else:
                self._queue.pop(k, None)
                if levels is not None and levels != p.map_levels:
                    p.map.set_style(levels=levels)
                    p.map_levels = levels
                self._set_bar(p)
        self.ranges = ranges
        self._kick()

    def _set_bar(self, p: ExplanationPanel) -> None:
        """Panel ``p``'s colour bar: its quantity, the levels its map is drawn with, the colour map."""
        label = scale_label(p.key) + (" (one scale, all maps)" if self.scale_mode == SCALE_SHARED
                                      and panel_ref(p.key).spec.fixed_range is None else "")
        p.set_scale(label, p.map_levels, self.colormap_name)

    def _draw(self, p: ExplanationPanel, ct: Any, study: Any, levels: Any, lut: np.ndarray) -> None:
        if study is not None and p.study is not study and ct.image is None:
            self._show_study(p, study)
        p.show_content(ct, study=study, levels=levels, lut=lut, opacity=self.opacity,
                       gt_visible=self.state.gt_visible, pyramid=self._pyramid)
        p.map_levels = levels
        self._set_bar(p)
        if not p.own_window and (p is self.original or self.linked) and p.has_image() and not p.own_image:
            p.set_window(*self.state.window)
        p.set_invert(self._invert_for(p))

    def set_show_prior(self, on: bool) -> None:
        """Draw (or hide) the location prior's grey box of the shown class in the panels with its maps."""
        self.show_prior = bool(on)
        self.refresh()

    def set_show_proposals(self, on: bool) -> None:
        """Draw (or hide) the shown class's best proposals on the original panel."""
        self.show_proposals = bool(on)
        self.refresh()

    def set_manifests(self, manifests: dict[str, Any]) -> None:
        """The current model set's manifests by bundle folder name (their model cards)."""
        self.manifests = dict(manifests)
        self.refresh()

    def filled_keys(self) -> list[str]:
        return [k for k in self.order if self.panels[k].filled]

    # ---- style ------------------------------------------------------------------------
    def set_colormap(self, name: str) -> None:
        self.colormap_name = name
        lut = overlay_lut(name)
        for p in self.panels.values():
            p.map.set_style(lut=lut)
            self._set_bar(p)

    def set_opacity(self, opacity: float) -> None:
        self.opacity = float(opacity)
        for p in self.panels.values():
            p.map.set_style(opacity=self.opacity)

    def set_scale_mode(self, mode: str) -> None:
        self.scale_mode = mode
        self.refresh()
