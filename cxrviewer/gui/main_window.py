"""The main window: menus, docks, actions and wiring only.

Behaviour lives elsewhere: state in :mod:`.state`, background jobs in
:mod:`.workers`, drawing in :mod:`.views.image_panel`, W/L maths in
:mod:`.windowing`. This module connects them.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox,
                               QTextBrowser, QWidget)

from .. import __version__
from ..core import io as cio
from ..core.errors import CxrError
from ..core.io.worklist import Worklist
from ..core.study import Study
from . import settings, windowing
from .state import ViewerState
from .views.image_panel import ImagePanel
from .widgets.log_panel import LogPanel, QtLogHandler
from .widgets.study_list import StudyList

log = logging.getLogger(__name__)

APP_TITLE = "cxrviewer"
LOAD_TIMEOUT_S = 30.0
CACHE_SIZE = 4

SHORTCUTS_HTML = """
<h3>Mouse</h3>
<table cellpadding="3">
<tr><td><b>Right drag</b></td><td>window/level: left&ndash;right = width (right = wider, less
contrast), up&ndash;down = centre (down = darker); steps scale with the current width</td></tr>
<tr><td><b>Left drag</b></td><td>pan (window/level instead while <b>W/L mode</b> is on, key W)</td></tr>
<tr><td><b>Middle drag</b></td><td>pan</td></tr>
<tr><td><b>Wheel</b></td><td>zoom about the cursor</td></tr>
</table>
<h3>Keys</h3>
<table cellpadding="3">
{presets}
<tr><td><b>I</b></td><td>invert grey scale</td></tr>
<tr><td><b>W</b></td><td>W/L mode: left drag does window/level</td></tr>
<tr><td><b>G</b></td><td>show/hide ground-truth boxes</td></tr>
<tr><td><b>Space</b></td><td>reset: fit image and header window</td></tr>
<tr><td><b>F</b></td><td>fit image to the panel</td></tr>
<tr><td><b>+ / &minus;</b></td><td>zoom in / out</td></tr>
<tr><td><b>&rarr; &darr; Page Down</b></td><td>next study</td></tr>
<tr><td><b>&larr; &uarr; Page Up</b></td><td>previous study</td></tr>
<tr><td><b>Ctrl+O / Ctrl+Shift+O</b></td><td>open files / open folder</td></tr>
</table>
<p>Presets 3&ndash;5 are fractions of the image's robust range (1st&ndash;99th percentile of
the modality values) along a density axis (0 = air, 1 = bone), because radiograph values are
not calibrated like CT Hounsfield units; for MONOCHROME1 images the axis is reversed.
The status bar shows the window as centre/width in modality units and the zoom in screen
pixels per image pixel.</p>
"""


def shortcuts_html() -> str:
    """The Help > Keyboard shortcuts text (preset rows generated from windowing.PRESETS)."""
    rows = "\n".join(f"<tr><td><b>{p.key}</b></td><td>window preset: {p.name} "
                     f"({windowing.describe(p)})</td></tr>" for p in windowing.PRESETS)
    return SHORTCUTS_HTML.replace("{presets}", rows)


def _num(v: float) -> str:
    """Compact number for the status bar: integers when large, 3 significant digits else."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


class MainWindow(QMainWindow):
    """Study list (left dock), image panel (centre), messages (bottom dock)."""

    def __init__(self, parent: QWidget | None = None, *, popup_errors: bool = False,
                 models_dir: str | None = None) -> None:
        super().__init__(parent)
        from .workers import JobRunner

        self.popup_errors = popup_errors  # QMessageBox (non-modal) on load errors
        self.models_dir = models_dir  # for the model panels (issue 5)
        self.setWindowTitle(APP_TITLE)
        self.resize(1280, 860)
        self.setAcceptDrops(True)

        self.state = ViewerState(self)
        self.runner = JobRunner(self)
        self._cache: OrderedDict[str, Study] = OrderedDict()
        self._load_rows: dict[int, int] = {}  # load seq -> worklist row
        self._closing = False
        self._error_box: QMessageBox | None = None

        self.panel = ImagePanel(self)
        self.panel.bind(self.state)
        self.setCentralWidget(self.panel)

        self.study_list = StudyList(self.state, self)
        self.study_dock = self._dock("Studies", self.study_list, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.log_panel = LogPanel(self)
        self.log_dock = self._dock("Messages", self.log_panel, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.log_dock.hide()
        self._log_handler = QtLogHandler(self.log_panel)
        logging.getLogger("cxrviewer").addHandler(self._log_handler)

        self.resizeDocks([self.study_dock], [340], Qt.Orientation.Horizontal)
        self._make_status_bar()
        self._make_actions()
        self._make_menus()
        self._wire()
        self._help: QTextBrowser | None = None

    # ---- construction ---------------------------------------------------
    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title.lower()}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _make_status_bar(self) -> None:
        sb = self.statusBar()
        self.cursor_label = QLabel("")
        self.wl_label = QLabel("W/L –")
        self.zoom_label = QLabel("Zoom –")
        for w in (self.cursor_label, self.wl_label, self.zoom_label):
            w.setMinimumWidth(90)
            sb.addPermanentWidget(w)

    def _action(self, text: str, slot, shortcuts: Sequence[str | QKeySequence] = (), *,
                checkable: bool = False, tip: str = "") -> QAction:
        act = QAction(text, self)
        if shortcuts:
            act.setShortcuts([QKeySequence(s) for s in shortcuts])
        act.setCheckable(checkable)
        if tip:
            act.setStatusTip(tip)
        act.triggered.connect(slot)
        self.addAction(act)  # shortcuts work with menus hidden too
        return act

    def _make_actions(self) -> None:
        a = self._action
        self.act_open_files = a("Open &File(s)…", self.open_files_dialog, [QKeySequence.StandardKey.Open])
        self.act_open_folder = a("Open F&older…", self.open_folder_dialog, ["Ctrl+Shift+O"])
        self.act_quit = a("&Quit", self.close, ["Ctrl+Q"])
        self.act_presets = []
        for p in windowing.PRESETS:
            act = a(f"{p.name}", lambda _=False, k=p.key: self.apply_preset(k), [p.key])
            act.setStatusTip(windowing.describe(p))
            self.act_presets.append(act)
        self.act_invert = a("&Invert", lambda on: self.state.set_invert(on), ["I"], checkable=True)
        self.act_wl_mode = a("&W/L mode (left drag)", self.panel.set_wl_mode, ["W"], checkable=True)
        self.act_gt = a("Ground-truth &boxes", self.state.set_gt_visible, ["G"], checkable=True)
        self.act_gt.setChecked(self.state.gt_visible)
        self.act_reset = a("&Reset view", self.reset_view, ["Space"])
        self.act_fit = a("&Fit", self.panel.fit, ["F"])
        self.act_zoom_in = a("Zoom &in", lambda: self.panel.zoom(1.25), ["+", "=", QKeySequence.StandardKey.ZoomIn])
        self.act_zoom_out = a("Zoom &out", lambda: self.panel.zoom(0.8), ["-", QKeySequence.StandardKey.ZoomOut])
        self.act_next = a("&Next study", lambda: self.state.step(1), ["Right", "Down", "PgDown"])
        self.act_prev = a("&Previous study", lambda: self.state.step(-1), ["Left", "Up", "PgUp"])
        self.act_shortcuts = a("&Keyboard shortcuts", self.show_shortcuts, [QKeySequence.StandardKey.HelpContents])
        self.act_about = a("&About", self.show_about)

    def _make_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addActions([self.act_open_files, self.act_open_folder])
        m.addSeparator()
        m.addAction(self.act_quit)
        v = mb.addMenu("&View")
        presets = v.addMenu("Window &presets")
        presets.addActions(self.act_presets)
        v.addActions([self.act_invert, self.act_wl_mode, self.act_gt])
        v.addSeparator()
        v.addActions([self.act_reset, self.act_fit, self.act_zoom_in, self.act_zoom_out])
        v.addSeparator()
        v.addActions([self.act_next, self.act_prev])
        v.addSeparator()
        v.addAction(self.study_dock.toggleViewAction())
        v.addAction(self.log_dock.toggleViewAction())
        h = mb.addMenu("&Help")
        h.addActions([self.act_shortcuts, self.act_about])

    def _wire(self) -> None:
        s = self.state
        s.currentIndexChanged.connect(self._on_current_index)
        s.studyChanged.connect(self._on_study_changed)
        s.windowChanged.connect(self._update_wl_label)
        s.invertChanged.connect(self._on_invert_changed)
        self.panel.viewChanged.connect(self._update_zoom_label)
        self.panel.cursorMoved.connect(self._update_cursor_label)
        self.runner.finished.connect(self._on_job_finished)
        self.runner.failed.connect(self._on_job_failed)

    # ---- opening --------------------------------------------------------
    def open_paths(self, paths: Sequence[str | os.PathLike[str]]) -> int:
        """Expand ``paths`` to a worklist off the GUI thread; returns the request number."""
        paths = [str(p) for p in paths]
        if not paths:
            return 0
        self.statusBar().showMessage(f"Opening {len(paths)} path(s)…")
        return self.runner.submit("worklist", cio.open_worklist, paths)

    def open_files_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Open studies", settings.last_dir(),
            "Radiographs (*.dcm *.dicom *.DCM *.png *.jpg *.jpeg *.tif *.tiff);;All files (*)")
        if files:
            settings.set_last_dir(files[0])
            self.open_paths(files)

    def open_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open folder", settings.last_dir())
        if folder:
            settings.set_last_dir(folder)
            self.open_paths([folder])

    def set_worklist(self, worklist: Worklist) -> None:
        """Show a worklist and select its first study."""
        self.runner.cancel("load")
        self._cache.clear()
        self._load_rows.clear()
        self.state.set_worklist(worklist)
        for msg in worklist.errors:
            self.log_panel.add(msg, "warning")
        if worklist.errors:
            self.log_dock.show()
        if len(worklist):
            self.statusBar().showMessage(f"{len(worklist)} studies from {worklist.source or 'the opened paths'}", 5000)
            self.state.set_current_index(0)
        else:
            self.statusBar().showMessage("No studies found in the opened paths")

    # ---- loading --------------------------------------------------------
    def _on_current_index(self, row: int) -> None:
        for old_row in self._load_rows.values():
            if self.study_list.status(old_row) == "loading…":
                self.study_list.set_status(old_row, "")
        self._load_rows.clear()
        ref = self.state.current_ref
        if ref is None:
            return
        cached = self._cache.get(ref.key)
        if cached is not None:
            self.runner.cancel("load")
            self._cache.move_to_end(ref.key)
            self.state.set_study(cached)
            return
        self.study_list.set_status(row, "loading…")
        self.statusBar().showMessage(f"Loading {ref.display_name}…")
        seq = self.runner.submit("load", ref.load, timeout=LOAD_TIMEOUT_S)
        self._load_rows[seq] = row

    def _on_job_finished(self, channel: str, seq: int, result: object) -> None:
        if channel == "worklist" and isinstance(result, Worklist):
            self.set_worklist(result)
        elif channel == "load" and isinstance(result, Study):
            row = self._load_rows.pop(seq, self.state.current_index)
            ref = self.state.worklist[row] if 0 <= row < len(self.state.worklist) else None
            if ref is not None:
                self._cache[ref.key] = result
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self.study_list.set_status(row, "ok")
            self.state.set_study(result)

    def _on_job_failed(self, channel: str, seq: int, message: str, exc: object) -> None:
        if channel == "load":
            row = self._load_rows.pop(seq, self.state.current_index)
            self.study_list.set_status(row, "error", error=True)
            self.state.set_study(None)
        self.report_error(message, expected=isinstance(exc, CxrError))

    def report_error(self, message: str, *, expected: bool = True) -> None:
        """Status bar + message log; a non-modal box too when ``popup_errors``."""
        text = message if expected else f"Unexpected error: {message}"
        self.statusBar().showMessage(text, 15000)
        self.log_panel.add(text, "error")
        self.log_dock.show()
        if self.popup_errors and not self._closing:
            if self._error_box is None:
                self._error_box = QMessageBox(QMessageBox.Icon.Warning, APP_TITLE, "", parent=self)
                self._error_box.setWindowModality(Qt.WindowModality.NonModal)
            self._error_box.setText(text)
            self._error_box.show()

    # ---- view actions -----------------------------------------------------
    def apply_preset(self, key: str) -> None:
        if not self.state.apply_preset(key):
            self.statusBar().showMessage("No study shown", 2000)

    def reset_view(self) -> None:
        """Fit the image and go back to the header window (and the study's invert)."""
        st = self.state
        if st.study is not None:
            st.apply_preset("1")
            st.set_invert(st.study.invert_display)
        self.panel.fit()

    # ---- state -> widgets ------------------------------------------------
    def _on_study_changed(self, study: Study | None) -> None:
        ref = self.state.current_ref
        if study is None:
            self.setWindowTitle(APP_TITLE)
            return
        name = ref.display_name if ref is not None else Path(study.meta.source_path).name
        self.setWindowTitle(f"{name} — {APP_TITLE}")
        h, w = study.shape
        m = study.meta
        kind = m.format.upper() + (f" {m.modality}" if m.modality else "")
        self.statusBar().showMessage(f"{name}: {w}×{h} px, {kind}, {m.photometric}"
                                     + (f", {len(study.gt_boxes)} GT box(es)" if study.gt_boxes else ""),
                                     8000)
        for warning in m.warnings:
            self.log_panel.add(f"{name}: {warning}", "warning")

    def _on_invert_changed(self, on: bool) -> None:
        self.act_invert.setChecked(on)
        self._update_wl_label(*self.state.window)

    def _update_wl_label(self, centre: float, width: float) -> None:
        if self.state.study is None:
            self.wl_label.setText("W/L –")
            return
        preset = f" ({self.state.preset_name})" if self.state.preset_name else ""
        inv = " inv" if self.state.invert else ""
        self.wl_label.setText(f"C {_num(centre)} W {_num(width)}{preset}{inv}")

    def _update_zoom_label(self, zoom: float) -> None:
        self.zoom_label.setText(f"Zoom {zoom * 100:.0f}%")

    def _update_cursor_label(self, x: float, y: float, value: float) -> None:
        if value != value:  # NaN: outside the image
            self.cursor_label.setText("")
        else:
            self.cursor_label.setText(f"x {int(x)} y {int(y)}: {value:.5g}")

    # ---- help -------------------------------------------------------------
    def show_shortcuts(self) -> None:
        if self._help is None:
            self._help = QTextBrowser()
            self._help.setWindowTitle("Keyboard shortcuts — cxrviewer")
            self._help.setHtml(shortcuts_html())
            self._help.resize(620, 640)
            self._help.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)
        self._help.show()
        self._help.raise_()

    def show_about(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Information, "About cxrviewer",
                          f"cxrviewer {__version__}\nChest X-ray explainability and annotation desktop.",
                          parent=self)
        box.setWindowModality(Qt.WindowModality.NonModal)
        box.show()

    # ---- drag and drop ------------------------------------------------------
    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt naming
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt naming
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)

    # ---- closing ------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt naming
        """Stop background work first: queued jobs dropped, the running one awaited."""
        self._closing = True
        self.runner.shutdown(timeout_ms=int((LOAD_TIMEOUT_S + 15) * 1000))
        logging.getLogger("cxrviewer").removeHandler(self._log_handler)
        if self._help is not None:
            self._help.close()
        if self._error_box is not None:
            self._error_box.close()
        super().closeEvent(event)
