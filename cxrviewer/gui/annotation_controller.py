"""Annotation tools of one window: project lifecycle, annotation mode, and the wiring of the parts.

The parts, each in its own module:

* :class:`~cxrviewer.core.annotations.AnnotationSession` (Qt-free): the open project
  (one SQLite file, every edit committed at once), the undo history, the shown study
  and every edit;
* :class:`~cxrviewer.gui.views.box_editor.BoxEditor` on the image panel and the
  :class:`~cxrviewer.gui.widgets.annotations.AnnotationDock`;
* :class:`~cxrviewer.gui.annotation_edits.AnnotationEdits` (edit commands, redraw),
  :class:`~cxrviewer.gui.annotation_clipboard.AnnotationClipboard`,
  :class:`~cxrviewer.gui.annotation_io.AnnotationIO` (exports, imports, file dialogs),
  :class:`~cxrviewer.gui.finetune.FineTuneController` and
  :class:`~cxrviewer.gui.annotation_actions.AnnotationActions` (keys and menus).

The window places the dock and menus and connects its own signals::

    ctrl = AnnotationController(panel, state, window, status_bar=window.statusBar())
    ctrl.install_ui(window, file_menu=file_menu, before=quit_action, help_menu=help_menu)
    inference.finished.connect(ctrl.on_results)         # model boxes -> dashed proposals
    ctrl.bundleReady.connect(...)                        # "Fine-tune on my annotations" done

(:meth:`AnnotationController.attach` does the generic part for a plain window with
``panel`` and ``state``.)

Modes. *Annotation mode* (E, or any annotation action) turns the editing keys on:
Space marks the study done (the viewer's "reset view" moves to its menu entry
meanwhile), D/A step studies, Del deletes, Y/Enter accept and X/Backspace reject a
proposal, C/[ ] change the class, S selects the next box. Outside it the viewer's
keys are unchanged. See :data:`~cxrviewer.gui.annotation_actions.SHORTCUTS`.
E with no project open asks for one (new, open, the default one, or cancel);
:meth:`AnnotationController.reopen_last` reopens the last session's project.

Proposals: the current class's best three (Shift+C: every class's), in annotation mode
only unless Annotate > Proposals outside annotation mode is on
(:class:`~cxrviewer.gui.annotation_edits.AnnotationEdits`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QDockWidget, QMainWindow, QMenu, QStatusBar, QWidget

from ..core.annotations import (
    AnnotationSession, AnnotationStore, Edit, EditRefused, StudyRecord, proposals_from_results,
)
from ..core.errors import CxrError
from ..core.labelsets import LabelSet
from ..core.panels import PRIOR, reference_sources
from . import settings
from .annotation_actions import ANNOTATE, AnnotationActions
from .annotation_clipboard import AnnotationClipboard
from .annotation_edits import AnnotationEdits
from .annotation_feedback import AnnotationFeedback
from .annotation_io import (
    AnnotationIO, default_annotator, default_store_path, opened_folder, project_lock,
)
from .finetune import FineTuneController, FineTuneJob
from .shortcuts import ShortcutRegistry, ShortcutsDialog, registry_for
from .state import ViewerState
from .views.box_editor import BoxEditor
from .views.image_panel import ImagePanel
from .widgets.annotations import AnnotationDock


class AnnotationHost(Protocol):
    """What :meth:`AnnotationController.attach` needs of a window."""

    panel: ImagePanel
    state: ViewerState


def model_label(folder: str | None) -> str:
    """The name proposals of the models in ``folder`` are stored under."""
    return Path(folder).name if folder else "model"


class AnnotationController(QObject):
    """See the module docstring. ``parent`` gets the actions and owns the dialogs.

    ``status_bar``: where messages are shown; ``model_name``: the name of the models
    whose results :meth:`on_results` receives (default "model").
    """

    storeChanged = Signal(object)  # AnnotationStore | None
    modeChanged = Signal(bool)
    studyRecordChanged = Signal(object)  # StudyRecord | None
    edited = Signal(object)  # the committed Edit (also undo/redo)
    message = Signal(str)
    bundleReady = Signal(str)
    #: every edit up to this ticket is on disk (fsynced by the store's sync thread)
    durable = Signal(int)
    #: (ticket, message): making edits durable failed; the view was reloaded from the store
    syncFailed = Signal(int, str)

    POLL_MS = 2000

    def __init__(self, panel: ImagePanel, state: ViewerState, parent: QWidget, *,
                 annotator: str | None = None, registry: ShortcutRegistry | None = None,
                 status_bar: QStatusBar | None = None,
                 model_name: Callable[[], str] | None = None) -> None:
        super().__init__(parent)
        self.panel, self.state, self.host = panel, state, parent
        self.model_name = model_name or (lambda: "model")
        self.feedback = AnnotationFeedback(status_bar, self)
        self.session = AnnotationSession(annotator or default_annotator(), lock=project_lock,
                                         open_default=self.ensure_store, on_history=self._update_ui)
        self.editor = BoxEditor(panel, self)
        self.dock = AnnotationDock()
        self.dock_widget: QDockWidget | None = None
        self.edits = AnnotationEdits(self.session, self.editor, self.dock, self.feedback, parent, self)
        self.syncFailed.connect(self._sync_failed)
        self.durable.connect(self._on_durable)
        self.edits.edited.connect(self._on_edit_committed)
        self.edits.show_proposals = False  # view mode: proposals only when asked for
        self.clipboard = AnnotationClipboard(self.session, self.edits, panel, self.feedback)
        self.io = AnnotationIO(self.session, self.feedback, parent)
        self.finetune = FineTuneController(self.feedback, self)
        self._mode = False
        self._view_proposals = False  # proposals shown outside annotation mode too
        self._panel_proposals_visible = True
        self.registry = registry or registry_for(parent)
        self.actions = AnnotationActions(parent, self.registry, self._slots(),
                                         self._project_slots(), self.io.export_dialog,
                                         self.io.import_dialog)
        self._poll = QTimer(self)
        self._poll.setInterval(self.POLL_MS)
        self._poll.timeout.connect(self.poll_store)
        self._wire()
        self._update_ui()
        parent.installEventFilter(self)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def attach(cls, window: AnnotationHost, **kwargs: Any) -> "AnnotationController":
        """Controller, dock and an Annotate menu on a plain window with ``panel`` and ``state``."""
        if not isinstance(window, QMainWindow):
            raise TypeError("attach() needs a QMainWindow with panel and state")
        ctrl = cls(window.panel, window.state, window, status_bar=window.statusBar(), **kwargs)
        ctrl.install_ui(window)
        return ctrl

    def install_ui(self, window: QMainWindow, *, file_menu: QMenu | None = None,
                   before: QAction | None = None, help_menu: QMenu | None = None,
                   beside: QDockWidget | None = None) -> QDockWidget:
        """The dock (right; a tab of ``beside``) and the menus (see AnnotationActions.install)."""
        dock = QDockWidget("Annotations", window)
        dock.setObjectName("dock_annotations")
        dock.setWidget(self.dock)
        window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        if beside is not None:
            window.tabifyDockWidget(beside, dock)
            self.modeChanged.connect(lambda on: dock.raise_() if on else None)
        self.dock_widget = dock
        self.actions.install(window, dock.toggleViewAction(), file_menu=file_menu, before=before,
                             help_menu=help_menu)
        return dock

    def _slots(self) -> dict[str, Callable[..., Any]]:
        ed, clip = self.edits, self.clipboard
        return {
            "annot.mode": self.request_annotation_mode, "annot.draw": self.toggle_draw,
            "annot.delete": ed.delete_selected, "annot.copy": clip.copy_selected,
            "annot.paste": clip.paste, "annot.duplicate": clip.duplicate_selected,
            "annot.carry": clip.carry_previous, "annot.undo": ed.undo, "annot.redo": ed.redo,
            "annot.next": lambda: self.state.step(1), "annot.prev": lambda: self.state.step(-1),
            "annot.done": ed.toggle_done, "annot.accept": ed.accept_proposal,
            "annot.reject": ed.reject_proposal, "annot.class_menu": ed.class_menu,
            "annot.class_next": lambda: ed.step_class(1),
            "annot.class_prev": lambda: ed.step_class(-1),
            "annot.select_next": lambda: self.editor.select_step(1),
            "annot.select_prev": lambda: self.editor.select_step(-1),
            "annot.cancel": self.editor.cancel, "annot.finetune": self.start_finetune_default,
            "annot.all_classes": lambda on: ed.set_proposal_view(all_classes=on),
            "annot.view_proposals": self.set_view_proposals,
            "annot.shortcuts": self.show_shortcuts,
        }

    def _project_slots(self) -> dict[str, Callable[[], Any]]:
        return {"new": self.new_store_dialog, "open": lambda: self.open_store_dialog(False),
                "open_ro": lambda: self.open_store_dialog(True), "default": self.ensure_store,
                "close": self.close_store}

    def _wire(self) -> None:
        self.state.studyChanged.connect(self._on_study_changed)
        self.feedback.message.connect(self.message)
        ed, dock, edits = self.editor, self.dock, self.edits
        ed.drawRequested.connect(edits.gesture_draw)
        ed.geometryRequested.connect(edits.gesture_geometry)
        ed.selectionChanged.connect(dock.set_selection)
        ed.refused.connect(self.feedback.info)
        ed.drawModeChanged.connect(lambda _on: self._update_mode_text())
        ed.drawLabelChanged.connect(dock.set_class)
        ed.drawLabelChanged.connect(lambda _label: self._update_mode_text())
        for signal, slot in ((dock.selectionChosen, ed.select), (dock.classChosen, edits.set_class),
                             (dock.labelChosen, edits.set_label), (dock.statusChosen, edits.set_status),
                             (dock.finetuneRequested, self.start_finetune_default),
                             (dock.cancelRequested, self.finetune.cancel)):
            signal.connect(slot)
        edits.edited.connect(self.edited)
        edits.refreshed.connect(self._update_ui)
        self.io.imported.connect(lambda _edit: self._sync_record())
        ft = self.finetune
        ft.progressChanged.connect(lambda f, text, running: dock.set_progress(f, text, running=running))
        ft.bundleReady.connect(self.bundleReady)

    # ---- the session's state -----------------------------------------------------------------
    @property
    def store(self) -> AnnotationStore | None:
        return self.session.store

    @property
    def record(self) -> StudyRecord | None:
        return self.session.record


    # ---- project lifecycle ---------------------------------------------------------------------
    def default_store_path(self) -> Path:
        """``<folder>.cxrann`` beside an opened folder, else ``default.cxrann`` in the data dir."""
        return default_store_path(self.state.worklist.source)

    def ensure_store(self) -> bool:
        """Open the default project when none is open (so no drawn box is ever lost)."""
        if self.session.store is not None:
            return True
        path = self.default_store_path()
        ok = self.open_store(path)
        if ok:
            self.feedback.info(f"Annotations are saved in {path}")
        return ok

    def reopen_last(self) -> bool:
        """Reopen the last session's project (setting ``annotation/last_store``) when none is open
        and the file still exists."""
        if self.session.store is not None:
            return True
        last = str(settings.app_settings().value("annotation/last_store", "") or "")
        if not last or not Path(last).is_file():
            return False
        ok = self.open_store(last, create=False)
        if ok:
            self.feedback.info(f"Annotation project {last} reopened")
        return ok

    def open_store(self, path: str | os.PathLike, *, read_only: bool = False,
                   create: bool = True, label_set: LabelSet | str | None = None) -> bool:
        """Open (or create) an annotation project; a second instance is told so.

        ``label_set``: a new project's label set (default nih14); the class chooser and the
        image-label rows follow the project's.
        """
        self.close_store()
        try:
            store = self.session.open(
                path, read_only=read_only, create=create, background_sync=True, label_set=label_set,
                on_durable=self.durable.emit,  # emitted on the sync thread: queued to the GUI
                on_sync_error=lambda t, exc: self.syncFailed.emit(t, str(exc)))
        except CxrError as exc:
            self.feedback.error(str(exc))
            return False
        settings.app_settings().setValue("annotation/last_store", str(path))
        self.dock.set_store_info(str(path), self.session.notice)
        self._show_save_state()
        self._poll.start()
        self._sync_record()
        self._update_ui()
        self.storeChanged.emit(store)
        return True

    def _show_save_state(self) -> None:
        s = self.session
        if s.store is None:
            self.dock.set_save_state("none")
        elif not s.writable:
            self.dock.set_save_state("read_only")
        elif s.syncer is None or s.syncer.durable >= s.syncer.submitted:
            self.dock.set_save_state("saved")
        else:
            self.dock.set_save_state("saving")

    def _on_edit_committed(self, _edit: object) -> None:
        if self.dock.save_state != "failed":
            self._show_save_state()

    def _on_durable(self, _ticket: int) -> None:
        """The sync thread put edits on disk (queued here from that thread); a later fsync
        that succeeds covers the edits of an earlier failed one too."""
        self._show_save_state()

    def _sync_failed(self, _ticket: int, message: str) -> None:
        """The disk refused the fsync: say so and redraw from the store."""
        self.feedback.error(f"Edits may not be saved to disk: {message}")
        self.dock.set_save_state("failed", message)
        if self.session.store is not None:
            self.edits.refresh()

    def close_store(self) -> None:
        """Close the project; waits until every edit made is on disk (and a running DICOM SEG
        export of it is written)."""
        if self.session.store is None:
            return
        self.io.wait_for_export()
        self._poll.stop()
        self.editor.clear()
        self.edits.flush_view()  # (a pending dock update must not outlive the project)
        self.session.close()
        self.edits.sync_labels()
        self.dock.set_store_info(None)
        self.dock.set_save_state("none")
        self.dock.show_study([], {}, None)
        self._update_ui()
        self.storeChanged.emit(None)

    def poll_store(self) -> None:
        """Redraw when another instance changed the project."""
        if self.session.changed_elsewhere():
            self.edits.refresh()

    def new_store_dialog(self) -> None:
        path = self.io.new_project_path(self.default_store_path())
        if not path:
            return
        exists = Path(path).is_file()  # (an existing project keeps its label set)
        label_set = None if exists else self.io.choose_label_set()
        if label_set is None and not exists:
            return  # cancelled
        if self.open_store(path, label_set=label_set):
            self.set_annotation_mode(True)

    def open_store_dialog(self, read_only: bool = False) -> None:
        path = self.io.open_project_path(self.default_store_path().parent)
        if path and self.open_store(path, read_only=read_only, create=False):
            self.set_annotation_mode(True)

    # ---- studies ---------------------------------------------------------------------------------
    def _on_study_changed(self, study: Any) -> None:
        self.editor.set_draw_mode(False)
        try:
            self.session.set_study(study)
        except CxrError as exc:
            self.feedback.error(f"annotation store: {exc}")
        self._record_changed()

    def _sync_record(self) -> None:
        try:
            self.session.sync_record()
        except CxrError as exc:
            self.feedback.error(f"annotation store: {exc}")
        self._record_changed()

    def _record_changed(self) -> None:
        self.studyRecordChanged.emit(self.session.record)
        self.edits.refresh()

    def on_results(self, _sha: str, results: Any, _source: str = "") -> None:
        """Pipeline results -> dashed proposals (annotation mode, or proposals asked for in view
        mode; shown study only)."""
        study = self.session.study
        if not (self._mode or self._view_proposals) or study is None:
            return
        # the location prior is a reference box (View > Show location prior), never a proposal to accept
        refs = reference_sources() | {PRIOR}
        groups = {src: bxs for src, bxs in proposals_from_results(results, study.study_id).items() if src not in refs}
        if groups:
            self.edits.add_model_proposals(groups, self.model_name())

    def add_box(self, label: str, x: float, y: float, w: float, h: float) -> Edit | None:
        """Add a box from code (the same path as a mouse-drawn box)."""
        return self.edits.draw(label, x, y, w, h)

    # ---- mode ----------------------------------------------------------------------------------------
    @property
    def annotation_mode(self) -> bool:
        return self._mode

    def request_annotation_mode(self, on: bool = True) -> None:
        """E / the menu: :meth:`set_annotation_mode`, but with no project open the user chooses
        one first (new, open, the default one; cancel leaves annotation mode off)."""
        if not on or self.session.store is not None:
            self.set_annotation_mode(on)
            return
        choice = self.io.choose_project(self.default_store_path())
        if choice == "new":
            self.new_store_dialog()
        elif choice == "open":
            self.open_store_dialog()
        elif choice == "default":
            self.set_annotation_mode(True)
        self.actions.set_mode_checked(self._mode)
        self.panel.setFocus()  # the keys work at once, without a click on the image

    def set_annotation_mode(self, on: bool = True) -> None:
        """Annotation mode on/off (on opens the default project when none is open)."""
        on = bool(on)
        if on and not self.ensure_store():
            on = False
        if on != self._mode:
            self._mode = on
            self._hide_panel_proposals(on)
            self.registry.set_mode(ANNOTATE if on else None)
            self.modeChanged.emit(on)
        self.actions.set_mode_checked(on)
        if not on:
            self.editor.set_draw_mode(False)
        self.edits.show_proposals = on or self._view_proposals
        self._update_ui()
        self.edits.refresh()

    def _hide_panel_proposals(self, hide: bool) -> None:
        """The panel's own (view-mode) proposal layer, if it has one, gives way to the editor's
        in annotation mode and comes back as it was after."""
        layer = getattr(self.panel, "layers", {}).get("proposals")
        if layer is None:
            return
        if hide:
            self._panel_proposals_visible = layer.visible
            layer.set_visible(False)
        else:
            layer.set_visible(self._panel_proposals_visible)

    def set_view_proposals(self, on: bool) -> None:
        """Show the model proposals in view mode too (Annotate > Proposals outside annotation mode)."""
        self._view_proposals = bool(on)
        self.actions.set_checked("annot.view_proposals", self._view_proposals)
        self.edits.set_proposal_view(shown=self._mode or self._view_proposals)

    def toggle_draw(self) -> None:
        """Draw one box (turning annotation mode on), or stop drawing."""
        if self.editor.draw_mode:
            self.editor.set_draw_mode(False)
            return
        if not self._mode:
            self.request_annotation_mode(True)
            if not self._mode:
                return
        try:
            self.session.check_editable()
        except EditRefused as exc:
            self.feedback.refused(exc)
            return
        self.editor.set_draw_mode(True)
        self.feedback.info(f"Draw a {self.editor.draw_label} box: left drag on the image "
                           "(Esc cancels)", 3000)

    def _update_mode_text(self) -> None:
        if not self._mode:
            text = "view (E: annotate)"
        elif self.editor.draw_mode:
            text = f"drawing {self.editor.draw_label} (drag on the image, Esc cancels)"
        else:
            text = "annotate" + (" (read-only)" if not self.session.writable else "")
        self.dock.set_mode_text(text)

    def _update_ui(self) -> None:
        s = self.session
        can_edit = s.writable and s.record is not None
        self.editor.set_enabled(self._mode and can_edit)
        self.dock.set_enabled(can_edit)
        self.actions.update(can_edit=can_edit, writable=s.writable, has_store=s.store is not None,
                            undo=s.undo_stack)
        self._update_mode_text()

    # ---- fine-tuning, help, shutdown ------------------------------------------------------------------
    def start_finetune(self, **kwargs: Any) -> FineTuneJob | None:
        """Fine-tune on this project (see :meth:`FineTuneController.start` for ``kwargs``)."""
        store = self.session.store
        return self.finetune.start(store.path if store else None,
                                   opened_folder(self.state.worklist.source), **kwargs)

    def start_finetune_default(self) -> None:
        """The menu entry / dock button: command and data from the settings."""
        store = self.session.store
        self.finetune.start_from_settings(store.path if store else None,
                                          opened_folder(self.state.worklist.source))

    def show_shortcuts(self) -> ShortcutsDialog:
        return self.actions.show_shortcuts()

    def shutdown(self) -> None:
        """Stop training (cancel + wait) and close the project (every edit is already saved)."""
        self.finetune.shutdown()
        self.actions.close_dialogs()
        self.close_store()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt naming
        if obj is self.host and event.type() == QEvent.Type.Close:
            self.shutdown()
        return False
