"""Application state shared by every panel, as one QObject with signals.

Panels never talk to each other directly: they read :class:`ViewerState` and
subscribe to its signals, and push user changes back through its setters. The
linked panel grid (:mod:`cxrviewer.gui.views.panel_grid`) and the box editor
connect to the same signals, so a window/level drag in one panel re-levels all.

Signals
-------
``worklistChanged()``
    a new worklist was opened (``state.worklist``).
``currentIndexChanged(int)``
    the selected row changed (loading may still be under way); -1 = none.
``studyChanged(object)``
    the decoded :class:`~cxrviewer.core.study.Study` for the current row is
    available (or ``None`` when cleared).
``windowChanged(float, float)``
    display window ``(centre, width)`` in modality units.
``invertChanged(bool)``
    display inversion toggled.
``gtVisibleChanged(bool)``
    ground-truth boxes shown or hidden.
"""
from __future__ import annotations

import logging

from PySide6.QtCore import QObject, Signal

from ..core.io.worklist import StudyRef, Worklist
from ..core.study import Study
from . import windowing as wl

log = logging.getLogger(__name__)


class ViewerState(QObject):
    """Current worklist, study, window/level and display toggles."""

    worklistChanged = Signal()
    currentIndexChanged = Signal(int)
    studyChanged = Signal(object)
    windowChanged = Signal(float, float)
    invertChanged = Signal(bool)
    gtVisibleChanged = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worklist: Worklist = Worklist()
        self.current_index: int = -1
        self.study: Study | None = None
        self.data_range: wl.DataRange | None = None
        self.window: wl.Window = (0.5, 1.0)
        self.invert: bool = False
        self.gt_visible: bool = True
        self.preset_name: str = ""

    # ---- worklist ------------------------------------------------------
    def set_worklist(self, worklist: Worklist) -> None:
        """Replace the worklist; the current row becomes -1 and the study None."""
        self.worklist = worklist
        self.current_index = -1
        self.worklistChanged.emit()
        self.set_study(None)

    @property
    def current_ref(self) -> StudyRef | None:
        i = self.current_index
        return self.worklist[i] if 0 <= i < len(self.worklist) else None

    def set_current_index(self, index: int) -> None:
        """Select a worklist row (clamped); emits only when it changes."""
        n = len(self.worklist)
        index = -1 if n == 0 else max(0, min(int(index), n - 1))
        if index != self.current_index:
            self.current_index = index
            self.currentIndexChanged.emit(index)

    def step(self, delta: int) -> None:
        """Move ``delta`` rows (next = +1, previous = -1)."""
        if len(self.worklist):
            self.set_current_index(self.current_index + delta if self.current_index >= 0 else 0)

    # ---- study and display ----------------------------------------------
    def set_study(self, study: Study | None) -> None:
        """Show a decoded study: header window, invert from MONOCHROME1."""
        self.study = study
        if study is not None:
            self.data_range = wl.data_range(study.modality)
            self.window = wl.preset_window(wl.PRESETS[0], self.data_range, study.window,
                                           study.invert_display)
            self.invert = bool(study.invert_display)
            self.preset_name = wl.PRESETS[0].name
        else:
            self.data_range = None
            self.preset_name = ""
        self.studyChanged.emit(study)
        self.windowChanged.emit(*self.window)
        self.invertChanged.emit(self.invert)

    def set_window(self, centre: float, width: float, *, preset_name: str = "") -> None:
        """Set the display window (modality units); width is kept positive."""
        if self.data_range is not None:
            width = max(float(width), wl.min_width(self.data_range))
        else:
            width = max(float(width), 1e-6)
        new = (float(centre), width)
        self.preset_name = preset_name
        if new != self.window:
            self.window = new
            self.windowChanged.emit(*new)

    def apply_preset(self, key: str) -> bool:
        """Apply preset ``key`` ('1'..'5'); False when no study is shown."""
        if self.study is None or self.data_range is None:
            return False
        preset = next((p for p in wl.PRESETS if p.key == key), None)
        if preset is None:
            return False
        c, w = wl.preset_window(preset, self.data_range, self.study.window,
                                self.study.invert_display)
        self.set_window(c, w, preset_name=preset.name)
        return True

    def drag_window(self, dx: float, dy: float) -> None:
        """Apply a W/L drag of ``(dx, dy)`` screen pixels (see windowing.drag_window)."""
        if self.data_range is None:
            return
        c, w = wl.drag_window(self.window, dx, dy, self.data_range, display_inverted=self.invert)
        self.set_window(c, w)

    def set_invert(self, invert: bool) -> None:
        invert = bool(invert)
        if invert != self.invert:
            self.invert = invert
            self.invertChanged.emit(invert)

    def toggle_invert(self) -> None:
        self.set_invert(not self.invert)

    def set_gt_visible(self, visible: bool) -> None:
        visible = bool(visible)
        if visible != self.gt_visible:
            self.gt_visible = visible
            self.gtVisibleChanged.emit(visible)
