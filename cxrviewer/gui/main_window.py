"""The main window: menus, docks, actions and wiring only.

Behaviour lives elsewhere: state in :mod:`.state`, background jobs in
:mod:`.workers`, drawing in :mod:`.views.image_panel` and the linked
:mod:`.views.panel_grid`, progressive inference and result caches in
:mod:`.inference`, exports in :mod:`.export`, W/L maths in :mod:`.windowing`.
This module connects them.

Layout (OHIF/Weasis habits): worklist on the left (filter box, sortable
columns with top findings and annotation status), the linked panel grid in the
centre with a view toolbar (layout, link, colour map, opacity, colour scale; each
panel with a map carries its own colour bar), findings and models on the right,
progress, per-stage times, device and model badges in the status bar (fields
elide, never overlap). The first show fits the window into its screen;
``restore_session`` (the app's window) reopens it as the user left it (:mod:`.window_state`).
File > Recent studies / projects live in :mod:`.recent`; Help > Open log folder shows the
folder of the rotating ``cxrviewer.log`` (:mod:`cxrviewer.core.logfile`).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QSignalBlocker, Qt, QUrl
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QDesktopServices, QKeySequence, QShowEvent
from PySide6.QtWidgets import (QComboBox, QDockWidget, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                               QMessageBox, QProgressBar, QSlider, QTextBrowser, QToolBar, QVBoxLayout,
                               QWidget)

from .. import __version__
from ..core.annotations import SUFFIX as PROJECT_SUFFIX
from ..core.catalog import model_classes
from ..core.display import DisplayData, load_for_display
from ..core.errors import CxrError
from ..core.explain.registry import applicable_explainers, get_explainer
from ..core.panels import needs_class_maps, not_available_lines, panel_ref
from ..core.result_cache import expand_paths
from ..core.roles import assign_roles
from ..core.io.worklist import Worklist
from ..core.logfile import current_log_dir
from ..core.results import Results
from ..core.study import Study
from . import recent, settings, window_state, windowing
from . import inference as inf
from .annotation_controller import AnnotationController, model_label
from .export import caption_lines, export_findings_csv, export_png
from .focus import install_focus_return
from .state import ViewerState
from .views.explain_panels import SCALE_MODES
from .views.panel_grid import LAYOUTS, PanelGrid
from .widgets.findings import FindingsPanel
from .widgets.log_panel import LogPanel, QtLogHandler
from .widgets.model_picker import ModelPicker, badge_html
from .widgets.status_flags import AlignmentFlag, ElidedLabel
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
<tr><td><b>Left drag</b></td><td>pan (window/level instead while <b>W/L mode</b> is on, key Shift+W)</td></tr>
<tr><td><b>Click</b></td><td>make a panel active (the colour bar shows its scale)</td></tr>
<tr><td><b>Middle drag</b></td><td>pan</td></tr>
<tr><td><b>Wheel</b></td><td>zoom about the cursor</td></tr>
</table>
<h3>Keys</h3>
<table cellpadding="3">
{presets}
<tr><td><b>I</b></td><td>invert grey scale</td></tr>
<tr><td><b>Shift+W</b></td><td>W/L mode: left drag does window/level</td></tr>
<tr><td><b>E, W/N, Ctrl+Z …</b></td><td>annotation mode, draw a box, undo …: all annotation keys (rebindable) in Help &gt; Keyboard shortcuts (edit)… (Ctrl+/)</td></tr>
<tr><td><b>G</b></td><td>show/hide ground-truth boxes</td></tr>
<tr><td><b>Shift+P</b></td><td>show/hide the location prior: the grey dashed median training box of the
shown class (a reference, never a finding; not selectable, not saved)</td></tr>
<tr><td><b>Space</b></td><td>reset: fit image and header window</td></tr>
<tr><td><b>F</b></td><td>fit the whole image in every panel (panels stay fitted on resize until you zoom or pan)</td></tr>
<tr><td><b>Shift+B</b></td><td>show/hide model proposals: the shown class's three best boxes, dashed, their score
labelled as a probability (p) or a raw map value (map)</td></tr>
<tr><td><b>+ / &minus;</b></td><td>zoom in / out</td></tr>
<tr><td><b>&rarr; &darr; Page Down</b></td><td>next study</td></tr>
<tr><td><b>&larr; &uarr; Page Up</b></td><td>previous study</td></tr>
<tr><td><b>L</b></td><td>link / unlink zoom, pan and window/level of all panels</td></tr>
<tr><td><b>Alt+1 &hellip; Alt+4</b></td><td>layout: all panels, 1x1, 2x2, 1xN</td></tr>
<tr><td><b>Ctrl+E / Ctrl+Shift+E</b></td><td>export panels (PNG) / findings (CSV)</td></tr>
<tr><td><b>Ctrl+O / Ctrl+Shift+O</b></td><td>open files / open folder</td></tr>
</table>
<p>Presets 3&ndash;5 are fractions of the image's robust range (1st&ndash;99th percentile of
the modality values) along a density axis (0 = air, 1 = bone), because radiograph values are
not calibrated like CT Hounsfield units; for MONOCHROME1 images the axis is reversed.
The status bar shows the window as centre/width in modality units and the zoom in screen
pixels per image pixel.</p>
"""


#: the window's size before the first show fits it into the screen
DEFAULT_SIZE = (1440, 900)


def shortcuts_html() -> str:
    """The Help > Keyboard shortcuts text (preset rows generated from windowing.PRESETS)."""
    rows = "\n".join(f"<tr><td><b>{p.key}</b></td><td>window preset: {p.name} "
                     f"({windowing.describe(p)})</td></tr>" for p in windowing.PRESETS)
    return SHORTCUTS_HTML.replace("{presets}", rows)


def _num(v: float) -> str:
    """Compact number for the status bar: integers when large, 3 significant digits else."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


class MainWindow(QMainWindow):
    """Worklist (left), linked panel grid (centre), findings + models (right), messages (bottom).

    ``models_dir``: the bundled model folder (default ``resources/models``);
    ``device``: a DeviceInfo or "auto"/"cpu"/"cuda" (default ``$CXRVIEWER_DEVICE`` or auto);
    ``cache_folder``: the HDF5 results cache (default ``<config>/results-cache``).
    """

    def __init__(self, parent: QWidget | None = None, *, popup_errors: bool = False,
                 models_dir: str | None = None, device: object = None,
                 cache_folder: str | None = None) -> None:
        super().__init__(parent)
        from ..core.device import DeviceInfo, select_device
        from .workers import JobRunner

        self.popup_errors = popup_errors  # QMessageBox (non-modal) on load errors
        self.models_dir = models_dir or os.environ.get("CXRVIEWER_MODELS") or None
        self._auto_layout = True  # all panels with models, one big panel without; until the user picks
        self.setWindowTitle(APP_TITLE)
        self.resize(*DEFAULT_SIZE)  # the first show shrinks it into the screen (fit_to_screen)
        self._fitted_to_screen = False
        self.setAcceptDrops(True)

        self.state = ViewerState(self)
        self.runner = JobRunner(self)  # decoding, worklists (I/O)
        # torch on its own single thread: paging through studies never waits for a model stage
        self.model_runner = JobRunner(self)
        self._cache: OrderedDict[str, Study] = OrderedDict()
        self._load_rows: dict[int, int] = {}  # load seq -> worklist row
        self._closing = False
        self._remember = False  # save the window's layout on close (restore_session)
        self._user_class = ""  # the class the user chose (saved; restored when the model set has it)
        self._pending_class = ""  # a restored class, applied to the first results that have it
        self._error_box: QMessageBox | None = None

        if not isinstance(device, DeviceInfo):
            device = select_device(str(device or os.environ.get("CXRVIEWER_DEVICE") or "auto"))
        self.device = device
        self.inference = inf.InferenceController(
            self.model_runner, self, device=device, cache_folder=Path(cache_folder) if cache_folder else None)
        self.results: Results | None = None  # what the grid shows (partial while running)

        self.grid = PanelGrid(self.state, self)
        self.panel = self.grid.original  # the original image panel (bound to the state via the grid)
        # keys work again as soon as a dialog closes (no click into the viewer needed)
        self._focus_return = install_focus_return(self, lambda: self.grid.active)
        central = QWidget(self)
        lay = QVBoxLayout(central)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        self.view_bar = QToolBar("View", central)  # layout, focus panel, link
        self.legend_bar = QToolBar("Colours", central)  # colour map, opacity, scale
        lay.addWidget(self.view_bar)
        lay.addWidget(self.legend_bar)
        lay.addWidget(self.grid, 1)
        self.setCentralWidget(central)

        self._make_study_dock()
        self.findings = FindingsPanel(self)
        self.findings_dock = self._dock("Findings", self.findings, Qt.DockWidgetArea.RightDockWidgetArea)
        self.model_picker = ModelPicker(self)
        self.models_dock = self._dock("Models", self.model_picker, Qt.DockWidgetArea.RightDockWidgetArea)
        self.log_panel = LogPanel(self)
        self.log_dock = self._dock("Messages", self.log_panel, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.log_dock.hide()
        self._log_handler = QtLogHandler(self.log_panel)
        logging.getLogger("cxrviewer").addHandler(self._log_handler)

        self.resizeDocks([self.study_dock, self.findings_dock], [330, 270], Qt.Orientation.Horizontal)
        self.resizeDocks([self.findings_dock, self.models_dock], [420, 200], Qt.Orientation.Vertical)
        self._make_status_bar()
        self._make_actions()
        self._make_menus()
        self._make_view_bar()
        self._wire()
        self._help: QTextBrowser | None = None
        self.reload_model_folders()
        self.annotations = self._make_annotations()

    # ---- construction ---------------------------------------------------
    def _make_annotations(self) -> AnnotationController:
        """Boxes, annotation projects and fine-tuning: dock, menus, proposals, new bundles."""
        ann = AnnotationController(self.panel, self.state, self, status_bar=self.statusBar(),
                                   model_name=lambda: model_label(self.model_picker.folder))
        ann.install_ui(self, file_menu=self.file_menu, before=self.act_quit,
                       help_menu=self.help_menu, beside=self.findings_dock)
        self.findings_dock.raise_()  # findings first; the annotation tab comes up in annotation mode
        self.inference.finished.connect(ann.on_results)
        # a finished fine-tune offers its bundle ("Use the new model"); nothing switches by itself
        self.view_menu.addAction(ann.finetune.install_dock(self).toggleViewAction())
        ann.finetune.switchRequested.connect(lambda path: self.use_bundle(path, "Using the fine-tuned model"))
        ann.storeChanged.connect(self._on_store_changed)
        # File: New, Open, Open read-only, Recent annotation projects ▸, Open the default, Close
        self.file_menu.insertMenu(ann.actions.project.get("default", self.act_quit), self.recent_projects_menu)
        return ann

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title.lower()}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _make_study_dock(self) -> None:
        """The studies list in a dock whose title bar holds the filter box."""
        self.study_list = StudyList(self.state, self)
        self.filter_box = QLineEdit(self)
        self.filter_box.setPlaceholderText("Filter studies (name, label, finding)…")
        self.filter_box.setClearButtonEnabled(True)
        self.filter_box.textChanged.connect(self.study_list.set_filter)
        self.study_dock = self._dock("Studies", self.study_list, Qt.DockWidgetArea.LeftDockWidgetArea)
        title = QWidget(self.study_dock)
        tlay = QHBoxLayout(title)
        tlay.setContentsMargins(4, 2, 2, 2)
        tlay.addWidget(QLabel("<b>Studies</b>"))
        tlay.addWidget(self.filter_box, 1)
        self.study_dock.setTitleBarWidget(title)

    def _make_status_bar(self) -> None:
        """Fields that never overlap: cursor, W/L and zoom keep their width; stage times and device
        elide ("…", full text in the tooltip); the alignment flag and model badges stay whole."""
        sb = self.statusBar()
        self.cursor_label = ElidedLabel("", min_width=120)
        self.wl_label = ElidedLabel("W/L –", min_width=110)
        self.zoom_label = QLabel("Zoom –")
        self.zoom_label.setMinimumWidth(self.zoom_label.fontMetrics().horizontalAdvance("Zoom 1000%") + 8)
        for w in (self.cursor_label, self.wl_label, self.zoom_label):
            sb.addPermanentWidget(w)
        self.progress = QProgressBar(self)
        self.progress.setMaximumWidth(140)
        self.progress.setFormat("%v/%m stages")
        self.progress.hide()
        self.stage_label = ElidedLabel("", min_width=60, auto_tip=False)  # tooltip: per-stage times
        self.device_label = ElidedLabel(f"Device: {self.device}", min_width=60)
        self.models_label = QLabel("")
        self.models_label.setTextFormat(Qt.TextFormat.RichText)
        self.align_flag = AlignmentFlag(self)  # rejected alignment: red; accepted: quiet NCC
        for w in (self.align_flag, self.progress, self.stage_label, self.models_label, self.device_label):
            sb.addPermanentWidget(w, 1 if w in (self.stage_label, self.device_label) else 0)

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
        self.act_wl_mode = a("&W/L mode (left drag)", self.set_wl_mode, ["Shift+W"], checkable=True)
        self.act_gt = a("Ground-truth &boxes", self.state.set_gt_visible, ["G"], checkable=True)
        self.act_gt.setChecked(self.state.gt_visible)
        self.act_prior = a("Show location &prior", self.set_show_prior, ["Shift+P"], checkable=True,
                           tip="Grey dashed reference box: the median training box of the shown class")
        self.act_prior.setChecked(settings.show_prior())
        self.grid.show_prior = self.act_prior.isChecked()
        self.act_proposals = a("Show &proposals", self.grid.set_show_proposals, ["Shift+B"], checkable=True,
                               tip="Dashed boxes: the shown class's three best model proposals, with what their "
                                   "score is (p = probability, map = raw map value)")
        self.act_unavailable = a("Show panels the models &cannot fill", self.show_unavailable_panels,
                                 checkable=True, tip="Show every panel; one the model set cannot fill "
                                                     "says why (e.g. needs a CIA model, NIH classes only)")
        self.act_reset = a("&Reset view", self.reset_view, ["Space"])
        self.act_fit = a("&Fit", self.grid.fit_all, ["F"])
        self.act_zoom_in = a("Zoom &in", lambda: self.grid.zoom(1.25), ["+", "=", QKeySequence.StandardKey.ZoomIn])
        self.act_zoom_out = a("Zoom &out", lambda: self.grid.zoom(0.8), ["-", QKeySequence.StandardKey.ZoomOut])
        self.act_next = a("&Next study", lambda: self.state.step(1), ["Right", "Down", "PgDown"])
        self.act_prev = a("&Previous study", lambda: self.state.step(-1), ["Left", "Up", "PgUp"])
        self.act_shortcuts = a("&Keyboard shortcuts", self.show_shortcuts, [QKeySequence.StandardKey.HelpContents])
        self.act_about = a("&About", self.show_about)
        self.act_open_log = a("Open &log folder", self.open_log_folder,
                              tip="Open the folder of cxrviewer.log (messages of this and earlier sessions)")
        self.act_link = a("&Link panels", self.grid.set_linked, ["L"], checkable=True,
                          tip="Link zoom, pan and window/level across panels")
        self.act_link.setChecked(True)
        self.act_layouts = QActionGroup(self)
        for i, name in enumerate(LAYOUTS, start=1):
            act = a({"grid": "All panels", "1xN": "1 x N"}.get(name, name), lambda _=False, n=name: self.set_layout(n),
                    [f"Alt+{i}"], checkable=True)
            act.setData(name)
            act.setChecked(name == self.grid.layout_name)
            self.act_layouts.addAction(act)
        self.act_export_png = a("Export &panels as PNG…", self.export_panels_dialog, ["Ctrl+E"])
        self.act_export_csv = a("Export &findings as CSV…", self.export_findings_dialog, ["Ctrl+Shift+E"])
        self.act_add_models = a("&Add model folder…", self.add_model_folder_dialog)
        self.act_rescan_models = a("&Rescan model folders", self.reload_model_folders)
        self.act_import_model = a("&Import model…", self.model_picker.open_import_dialog,
                                  tip="Turn a torchxrayvision, CheXNet-style, torchvision or timm checkpoint "
                                      "into a model bundle")

    def _make_menus(self) -> None:
        mb = self.menuBar()
        m = self.file_menu = mb.addMenu("&File")
        m.addActions([self.act_open_files, self.act_open_folder])
        self.recent_studies_menu = recent.RecentMenu("Recent &studies", recent.STUDIES, self.open_paths,
                                                     self._recent_note, m)
        self.recent_projects_menu = recent.RecentMenu("Recent annotation pro&jects", recent.PROJECTS,
                                                      self._open_recent_project, self._recent_note, m)
        m.addMenu(self.recent_studies_menu)  # (recent projects: beside the project entries, _make_annotations)
        m.addSeparator()
        m.addActions([self.act_export_png, self.act_export_csv])
        m.addSeparator()
        mm = m.addMenu("&Models")
        mm.addActions([self.act_import_model, self.act_add_models, self.act_rescan_models])
        m.addSeparator()
        m.addAction(self.act_quit)
        v = self.view_menu = mb.addMenu("&View")
        presets = v.addMenu("Window &presets")
        presets.addActions(self.act_presets)
        v.addActions([self.act_invert, self.act_wl_mode, self.act_gt, self.act_prior, self.act_proposals,
                      self.act_unavailable])
        v.addSeparator()
        v.addActions([self.act_reset, self.act_fit, self.act_zoom_in, self.act_zoom_out])
        v.addSeparator()
        v.addActions([self.act_next, self.act_prev])
        v.addSeparator()
        layouts = v.addMenu("&Layout")
        layouts.addActions(self.act_layouts.actions())
        v.addAction(self.act_link)
        v.addSeparator()
        for dock in (self.study_dock, self.findings_dock, self.models_dock, self.log_dock):
            v.addAction(dock.toggleViewAction())

        h = self.help_menu = mb.addMenu("&Help")
        h.addActions([self.act_shortcuts, self.act_open_log, self.act_about])

    def _make_view_bar(self) -> None:
        bar = self.view_bar
        bar.setMovable(False)
        self.layout_combo = QComboBox(bar)
        for name in LAYOUTS:
            self.layout_combo.addItem({"grid": "All panels"}.get(name, name), name)
        self.layout_combo.currentIndexChanged.connect(
            lambda _i: self.set_layout(self.layout_combo.currentData()))
        self.focus_combo = QComboBox(bar)
        for key in self.grid.order:
            self.focus_combo.addItem(panel_ref(key).spec.title, key)
        self.focus_combo.setToolTip("First panel shown by the 1x1 and 2x2 layouts")
        self.focus_combo.currentIndexChanged.connect(lambda _i: self.grid.set_focus(self.focus_combo.currentData()))
        self.cmap_combo = QComboBox(bar)
        from ..core.render import COLORMAPS

        for name in COLORMAPS:
            if name != "gray":
                self.cmap_combo.addItem(name, name)
        self.cmap_combo.setCurrentIndex(max(0, self.cmap_combo.findData(self.grid.colormap_name)))
        self.cmap_combo.currentIndexChanged.connect(lambda _i: self.grid.set_colormap(self.cmap_combo.currentData()))
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal, bar)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(int(self.grid.opacity * 100))
        self.opacity_slider.setMinimumWidth(80)
        self.opacity_slider.setMaximumWidth(110)
        self.opacity_slider.setToolTip("Heat map opacity")
        self.opacity_slider.valueChanged.connect(lambda v: self.grid.set_opacity(v / 100.0))
        self.scale_combo = QComboBox(bar)
        for mode, text in SCALE_MODES.items():
            self.scale_combo.addItem(text, mode)
        self.scale_combo.setToolTip("Colour scale: raw values, shared so panels are comparable")
        self.scale_combo.currentIndexChanged.connect(lambda _i: self.grid.set_scale_mode(self.scale_combo.currentData()))
        self.focus_combo.setMaximumWidth(170)
        for label, w in (("Layout ", self.layout_combo), (" ", self.focus_combo)):
            bar.addWidget(QLabel(label))
            bar.addWidget(w)
        bar.addAction(self.act_link)
        leg = self.legend_bar
        leg.setMovable(False)
        for label, w in (("Map ", self.cmap_combo), (" Opacity ", self.opacity_slider),
                         (" Scale ", self.scale_combo)):
            leg.addWidget(QLabel(label))
            leg.addWidget(w)

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
        inf_ = self.inference
        inf_.started.connect(self._on_inference_started)
        inf_.stageReady.connect(self._on_stage)
        inf_.finished.connect(self._on_results)
        inf_.failed.connect(self._on_inference_failed)
        inf_.unavailable.connect(self._on_inference_unavailable)
        inf_.classMined.connect(lambda *_: self.grid.refresh())
        self.findings.classSelected.connect(self.select_class)
        self.model_picker.modelSetChanged.connect(self._on_model_set)
        self.model_picker.bundleImported.connect(lambda path: self.use_bundle(path, "Imported model"))

    # ---- opening --------------------------------------------------------
    def open_paths(self, paths: Sequence[str | os.PathLike[str]]) -> int:
        """Expand ``paths`` to a worklist off the GUI thread; returns the request number."""
        paths = [str(p) for p in paths]
        projects = [p for p in paths if p.lower().endswith(PROJECT_SUFFIX)]  # annotation projects, not studies
        if projects:  # `cxrviewer PROJECT.cxrann` (a file manager's "Open with"): the annotation project
            self.annotations.open_store(projects[-1], create=False)
            paths = [p for p in paths if p not in projects]
        if not paths:
            return 0
        existing = [p for p in paths if Path(p).exists()]
        if existing:
            recent.add_recent(recent.STUDIES, existing)
        self.statusBar().showMessage(f"Opening {len(paths)} path(s)…")
        return self.runner.submit("worklist", expand_paths, paths)

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
        for row, ref in enumerate(worklist):
            if ref.extra.get("findings"):
                self.study_list.set_findings(row, [tuple(x) for x in json.loads(ref.extra["findings"])])
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
        seq = self.runner.submit("load", load_for_display, ref, LOAD_TIMEOUT_S)
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
        if channel in (inf.InferenceController.CHANNEL, inf.InferenceController.AM_CHANNEL):
            return  # reported by the inference controller
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
        for p in self.grid.panels.values():
            p.fit()

    def set_show_prior(self, on: bool) -> None:
        """View > Show location prior (kept in the settings)."""
        settings.set_show_prior(on)
        if self.act_prior.isChecked() != bool(on):
            self.act_prior.setChecked(bool(on))
        self.grid.set_show_prior(on)

    def set_wl_mode(self, on: bool) -> None:
        """Left drag does window/level in every panel (trackpads)."""
        for p in self.grid.panels.values():
            p.set_wl_mode(on)

    def set_layout(self, name: str, *, user: bool = True) -> None:
        """Panel layout: grid (all), 1x1, 2x2 or 1xN (keeps combo and menu in step)."""
        if user:
            self._auto_layout = False
        if name == self.grid.layout_name and self.layout_combo.currentData() == name:
            return
        self.grid.set_layout(name)
        for act in self.act_layouts.actions():
            act.setChecked(act.data() == name)
        i = self.layout_combo.findData(name)
        if i >= 0 and i != self.layout_combo.currentIndex():
            with QSignalBlocker(self.layout_combo):
                self.layout_combo.setCurrentIndex(i)

    # ---- explanations -------------------------------------------------------
    def select_class(self, class_index: int) -> None:
        """The class every panel shows (findings selection, tests)."""
        self.grid.set_class(class_index)
        self._pending_class = ""
        self._user_class = self.grid.class_name or self._user_class
        self.findings.select_class(class_index)
        res = self.results
        if res is not None and class_index < len(res.classes) and needs_class_maps(res, res.classes[class_index]):
            if self.inference.mine_class(res, class_index):
                self.statusBar().showMessage(f"Mining attention for {res.classes[class_index]}…", 3000)

    def _on_inference_started(self, _sha: str) -> None:
        self.results = None
        self.align_flag.clear_flag()
        self.progress.setRange(0, self._expected_stages())
        self.progress.setValue(0)
        self.progress.show()
        self.stage_label.setText("")

    def _roles(self) -> set[str]:
        """Pipeline roles of the selected model set (the same rule as the pipeline's)."""
        return set(assign_roles(self.inference.bundles))

    def _expected_stages(self) -> int:
        """preprocess + one stage per explainer the model set allows + boxes."""
        return 2 + len(applicable_explainers(self._roles()))

    def _show_results(self, res: Results, display: DisplayData) -> None:
        first = self.results is None or self.results.probabilities is None
        self.results = res
        self.grid.set_results(res, display=display)
        if self._pending_class and res.probabilities is not None:
            self._apply_restored_class(res)
        self.align_flag.set_results(res)
        if first and res.probabilities is not None:
            study = self.state.study
            self.findings.set_results(res, study.labels if study is not None else None,
                                      selected=self.grid.class_index)

    def _on_stage(self, update: inf.StageUpdate) -> None:
        self._show_results(update.results, update.display)
        self.progress.setValue(min(self.progress.maximum(), len(update.results.timings)))
        self.stage_label.setText(self._timings_text(update.results.timings))

    @staticmethod
    def _stage_abbrev(stage: str) -> str:
        """The explainer's short name for the status bar (``prep`` / ``box`` for the pipeline's own)."""
        if stage in ("preprocess", "boxes"):
            return {"preprocess": "prep", "boxes": "box"}[stage]
        try:
            return get_explainer(stage).short or stage
        except CxrError:
            return stage

    def _timings_text(self, timings: dict) -> str:
        """Per-stage seconds, short (the full names are in the tooltip)."""
        self.stage_label.setToolTip("\n".join(f"{k}: {v:.3f} s" for k, v in timings.items()))
        return " ".join(f"{self._stage_abbrev(k)} {v:.2f}" for k, v in timings.items())

    def _on_results(self, sha: str, res: Results, source: str) -> None:
        self._show_results(res, self.inference.display_for(sha))
        study = self.state.study
        self.findings.set_results(res, study.labels if study is not None else None,
                                  selected=self.grid.class_index)
        self.progress.setValue(self.progress.maximum())
        self.progress.hide()
        total = sum(res.timings.values())
        origin = {"memory": "from memory", "cache": "from the results cache", "run": "computed"}.get(
            source, source.replace("file ", "from "))
        self.stage_label.setText(f"{total:.1f} s ({origin}): {self._timings_text(res.timings)}")
        row = self.state.current_index
        if res.probabilities is not None and row >= 0:
            self.study_list.set_findings(row, [(res.classes[i], float(res.probabilities[i]))
                                               for i in res.top_classes(3)])
        for note in self._notices(res):
            self.log_panel.add(note, "warning")

    def _notices(self, res: Results) -> list[str]:
        """The results' notices, with the rejected-alignment flag when no notice says so already."""
        notes = list(res.notices)
        if self.align_flag.rejected and not any("alignment rejected" in n.lower() for n in notes):
            notes.append(self.align_flag.text())
        return notes

    def _on_inference_unavailable(self, _sha: str, why: str) -> None:
        self.progress.hide()
        if why == "no models":
            self.stage_label.setText("No model bundles: explanations off (File > Models > Add model folder…)")

    def _on_inference_failed(self, _sha: str, message: str) -> None:
        self.progress.hide()
        self.report_error(f"Analysis failed: {message}")

    # ---- models ---------------------------------------------------------------
    def model_folders(self) -> list[str]:
        from ..core.bundle import default_models_dir

        return [str(self.models_dir or default_models_dir()), *settings.model_dirs()]

    def reload_model_folders(self) -> None:
        active = settings.active_model_dir()
        folders = self.model_folders()
        self.model_picker.set_folders(folders, active if active in folders else folders[0])

    def add_model_folder(self, folder: str) -> None:
        dirs = settings.model_dirs()
        if folder not in dirs:
            settings.set_model_dirs([*dirs, folder])
        settings.set_active_model_dir(folder)
        self.reload_model_folders()

    def use_bundle(self, path: str, what: str) -> None:
        """Make ``path``'s model-set folder the active one with the bundle selected, and say so
        (a finished "Import model…", the fine-tune panel's "Use the new model")."""
        self.add_model_folder(str(Path(path).parent))
        self.model_picker.select_bundle(path)
        msg = f"{what} {Path(path).stem} ({path}); it is now the active model set"
        self.statusBar().showMessage(msg, 10000)
        self.log_panel.add(msg)

    def add_model_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a folder of model bundles", settings.last_dir())
        if folder:
            self.add_model_folder(folder)

    def _on_model_set(self, folder: str, bundles: list) -> None:
        if folder and folder != settings.active_model_dir() and folder in settings.model_dirs():
            settings.set_active_model_dir(folder)
        self.inference.set_bundles(bundles)
        self.grid.set_manifests(self.model_picker.manifests())
        roles = self._roles()
        if roles:
            self.grid.set_available(roles)
        self.findings.set_model_classes(model_classes(bundles))  # an 18-class model: 18 rows
        if self._auto_layout:
            self.set_layout("grid" if self.inference.bundles else "1x1", user=False)
        self.models_label.setText(badge_html(bundles))
        lines = not_available_lines(roles) if roles else []  # this model set's, not older results'
        missing = "Not available with these models:\n" + "\n".join(lines) if lines else ""
        self.models_label.setToolTip("\n".join([*(f"{b.name}: {b.role or b.family}"
                                                  + (f", {len(b.classes)} classes" if b.classes else "")
                                                  + (f" ({b.label_set})" if b.label_set else "")
                                                  + (f" [{b.badge}]" if b.badge else "") for b in bundles),
                                                *([missing] if missing else [])]))
        if lines:
            self.log_panel.add("Not available with these models: " + "; ".join(lines))
        if self.state.study is not None:
            self.grid.set_study(self.state.study)
            self._request_analysis(self.state.study)

    def show_unavailable_panels(self, on: bool) -> None:
        """Show the panels the model set cannot fill, each saying why (View menu), or hide them."""
        self.grid.set_hide_unavailable(not on)

    def _request_analysis(self, study: Study) -> None:
        ref = self.state.current_ref
        explicit = ref.extra.get("results") if ref is not None else None
        self.inference.request(study, results_file=explicit)

    # ---- export -----------------------------------------------------------------
    def _study_name(self) -> str:
        ref = self.state.current_ref
        return ref.display_name if ref is not None else (self.state.study.study_id if self.state.study else "")

    def export_panels(self, path: str) -> Path:
        """The panel grid as PNG with study, class, probability, models and device burned in."""
        self.grid.flush()
        return export_png(self.grid, path, caption_lines(self._study_name(), self.results, self.grid.class_index))

    def export_findings(self, path: str) -> Path:
        if self.results is None:
            raise CxrError("no findings to export: open a study and let the analysis finish")
        study = self.state.study
        return export_findings_csv(path, self.results, self._study_name(),
                                   study.labels if study is not None else None)

    def _export_dialog(self, title: str, suffix: str, filt: str, fn) -> None:
        default = str(Path(settings.last_dir()) / f"{Path(self._study_name() or 'study').stem}{suffix}")
        path, _ = QFileDialog.getSaveFileName(self, title, default, filt)
        if not path:
            return
        try:
            out = fn(path)
        except (CxrError, OSError) as exc:
            self.report_error(f"Export failed: {exc}")
            return
        self.statusBar().showMessage(f"Wrote {out}", 5000)

    def export_panels_dialog(self) -> None:
        self._export_dialog("Export panels", "_panels.png", "PNG images (*.png)", self.export_panels)

    def export_findings_dialog(self) -> None:
        self._export_dialog("Export findings", "_findings.csv", "CSV files (*.csv)", self.export_findings)

    # ---- state -> widgets ------------------------------------------------
    def _on_study_changed(self, study: Study | None) -> None:
        ref = self.state.current_ref
        self.align_flag.clear_flag()  # the flag belongs to the results of the study shown
        if study is None:
            self.setWindowTitle(APP_TITLE)
            self.inference.cancel()
            self.results = None
            self.progress.hide()
            self.findings.set_results(None)
            return
        self.findings.set_results(None, study.labels)
        self._request_analysis(study)
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
        # (without a study the view's scale means nothing: 4794% was shown for an empty panel)
        self.zoom_label.setText("Zoom –" if self.state.study is None else f"Zoom {zoom * 100:.0f}%")

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

    def open_log_folder(self) -> bool:
        """Help > Open log folder: the folder of ``cxrviewer.log`` in the file manager."""
        folder = current_log_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.log_panel.add(f"The log folder {folder} cannot be created: {exc.strerror or exc}", "warning")
            self.log_dock.show()
            return False
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))):
            self.log_panel.add(f"No file manager opened the log folder: {folder}", "warning")
            self.log_dock.show()
            return False
        return True

    # ---- recent files, the window as the user left it ------------------------------
    def _recent_note(self, text: str) -> None:
        self.log_panel.add(text, "warning")
        self.statusBar().showMessage(text, 8000)

    def _open_recent_project(self, entry: list[str]) -> None:
        if self.annotations.open_store(entry[0], create=False):
            self.annotations.set_annotation_mode(True)

    def _on_store_changed(self, store: object) -> None:
        path = getattr(store, "path", None)
        if path is not None:
            recent.add_recent(recent.PROJECTS, [str(path)])

    def user_layout(self) -> str:
        """The panel layout the user picked ('' while it follows the model set)."""
        return "" if self._auto_layout else self.grid.layout_name

    def user_class(self) -> str:
        """The class the user chose last ('' when the top finding is shown)."""
        return self._pending_class or self._user_class

    def restore_class(self, name: str) -> None:
        """Show class ``name`` once results have it (a restored session's class)."""
        self._pending_class = name
        if self.results is not None and self.results.probabilities is not None:
            self._apply_restored_class(self.results)

    def _apply_restored_class(self, res: Results) -> None:
        name, self._pending_class = self._pending_class, ""
        if name in res.classes:  # a model set without it shows its top finding
            c = res.classes.index(name)
            self.findings.select_class(c)
            self.select_class(c)

    def restore_session(self) -> bool:
        """Reopen as the user left it (geometry, docks, layout, colours, class; call before the first
        show) and save it again on close. True when the saved geometry fitted a screen."""
        self._remember = True
        return window_state.restore_window(self, DEFAULT_SIZE)

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
    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt naming
        """The first show fits the default-sized window into the available geometry of its screen
        (a size the caller chose is kept)."""
        super().showEvent(event)
        if not self._fitted_to_screen and (self.width(), self.height()) == DEFAULT_SIZE:
            self._fitted_to_screen = True
            self.fit_to_screen()

    def fit_to_screen(self) -> None:
        """Shrink (and move) the window into its screen's available geometry, never grow it."""
        screen = self.screen()
        if screen is None:
            return
        avail = screen.availableGeometry()
        frame = self.frameGeometry().size() - self.geometry().size()
        w = min(self.width(), avail.width() - frame.width())
        h = min(self.height(), avail.height() - frame.height())
        if (w, h) != (self.width(), self.height()):
            self.resize(max(w, 320), max(h, 240))
        x = min(max(self.x(), avail.left()), avail.right() - self.frameGeometry().width() + 1)
        y = min(max(self.y(), avail.top()), avail.bottom() - self.frameGeometry().height() + 1)
        if (x, y) != (self.x(), self.y()):
            self.move(max(x, avail.left()), max(y, avail.top()))

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt naming
        """Stop background work first: queued jobs dropped, the running one awaited."""
        self._closing = True
        if self._remember:
            window_state.save_window(self)
        self.inference.cancel()
        self.model_runner.shutdown(timeout_ms=int((LOAD_TIMEOUT_S + 15) * 1000))
        self.runner.shutdown(timeout_ms=int((LOAD_TIMEOUT_S + 15) * 1000))
        logging.getLogger("cxrviewer").removeHandler(self._log_handler)
        if self._help is not None:
            self._help.close()
        if self._error_box is not None:
            self._error_box.close()
        super().closeEvent(event)
