"""Ties the annotation store, the undo stack, the current study and the box editor.

The controller owns one :class:`~cxrviewer.core.annotations.AnnotationStore`
(one SQLite file per annotation project, every edit committed at once), a
session :class:`~cxrviewer.core.annotations.UndoStack` (unlimited), a
:class:`~cxrviewer.gui.views.box_editor.BoxEditor` on the window's image panel,
the annotation dock and the annotation actions (registered, rebindable, in
:mod:`cxrviewer.gui.shortcuts`). It attaches to any window that exposes
``panel`` (an :class:`ImagePanel`) and ``state`` (a :class:`ViewerState`)::

    ctrl = AnnotationController.attach(window)      # dock, menus, shortcuts
    ctrl.open_store("project.cxrann")                # or File > Open annotation project
    ctrl.bundleReady.connect(model_picker.reload)     # "Fine-tune on my annotations" done
    ctrl.add_model_proposals(results.boxes, "cia")    # model boxes -> dashed proposals

Modes. *Annotation mode* (E, or any annotation action) turns the editing keys
on: Space marks the study done (the viewer's "reset view" moves to its menu
entry meanwhile), D/A step studies, Del deletes, Y/Enter accept and X/Backspace
reject a proposal, C/[ ] change the class, S selects the next box. Outside it
the viewer's keys are unchanged. See :data:`SHORTCUTS` for the full table.

Every user edit is a single store transaction: a drag commits one edit on
release, a paste or carry-over one batch; a study's first edit also moves its
review status from *unseen* to *in progress* within the same transaction, and a
drawn box marks its class *present* if the image label was unset.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, QLockFile, QObject, QStandardPaths, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCursor, QGuiApplication
from PySide6.QtWidgets import QDockWidget, QFileDialog, QMainWindow, QMenu, QWidget

from ..core.annotations import (
    SUFFIX, AnnotationStore, Edit, EditConflictError, IMPORTERS, InvalidBoxError, StudyIdentity,
    StudyRecord, UndoStack, export_store,
)
from ..core.classes import CLASSES
from ..core.errors import CxrError
from ..core.geometry import Box
from . import settings
from .finetune import FineTuneJob, finetune_arguments
from .shortcuts import ShortcutRegistry, ShortcutsDialog, registry_for
from .views.box_editor import BoxEditor, EditorItem, ItemKey
from .widgets.annotations import AnnotationDock

log = logging.getLogger(__name__)

ANNOTATE = "annotate"

#: (id, menu text, default keys, mode, description) -- the README table is generated from it.
SHORTCUTS: tuple[tuple[str, str, tuple[str, ...], str | None, str], ...] = (
    ("annot.mode", "&Annotation mode", ("E",), None, "annotation mode on/off (editing keys live)"),
    ("annot.draw", "&Draw box", ("W", "N"), None, "draw one box: then left drag on the image"),
    ("annot.delete", "&Delete box", ("Del",), ANNOTATE, "delete the selected boxes (rejects selected proposals)"),
    ("annot.copy", "&Copy boxes", ("Ctrl+C",), None, "copy the selected boxes"),
    ("annot.paste", "&Paste boxes", ("Ctrl+V",), None, "paste the copied boxes into this study"),
    ("annot.duplicate", "D&uplicate boxes", ("Ctrl+D",), None, "duplicate the selected boxes (offset)"),
    ("annot.carry", "Carry boxes from the &previous study", ("Ctrl+P",), None,
     "copy the previously shown study's boxes here (scaled to this image)"),
    ("annot.undo", "&Undo", ("Ctrl+Z",), None, "undo (unlimited within the session)"),
    ("annot.redo", "&Redo", ("Ctrl+Shift+Z", "Ctrl+Y"), None, "redo"),
    ("annot.next", "Next study", ("D",), ANNOTATE, "next study"),
    ("annot.prev", "Previous study", ("A",), ANNOTATE, "previous study"),
    ("annot.done", "Mark &done", ("Space",), ANNOTATE, "mark the study done (again: back to in progress)"),
    ("annot.accept", "&Accept proposal", ("Y", "Return", "Enter"), ANNOTATE,
     "accept the selected (else the first) model proposal"),
    ("annot.reject", "&Reject proposal", ("X", "Backspace"), ANNOTATE,
     "reject the selected (else the first) model proposal"),
    ("annot.class_menu", "&Class…", ("C",), ANNOTATE, "choose the class (of the selection and of new boxes)"),
    ("annot.class_next", "Next class", ("]",), ANNOTATE, "next class"),
    ("annot.class_prev", "Previous class", ("[",), ANNOTATE, "previous class"),
    ("annot.select_next", "Select next box", ("S",), ANNOTATE, "select the next box/proposal"),
    ("annot.select_prev", "Select previous box", ("Shift+S",), ANNOTATE, "select the previous box/proposal"),
    ("annot.cancel", "Cancel drawing / clear selection", ("Esc",), ANNOTATE, "cancel drawing, else clear the selection"),
    ("annot.finetune", "&Fine-tune on my annotations…", (), None, "train a new bundle from this project"),
    ("annot.shortcuts", "Keyboard shortcuts (edit)…", ("Ctrl+/",), None, "list and rebind every shortcut"),
)

EXPORT_FORMATS = {"coco": "COCO JSON", "voc": "Pascal VOC", "yolo": "YOLO", "nih-csv": "NIH csv"}
IMPORT_FORMATS = {"nih-csv": "NIH csv (BBox_List_2017 layout)", "coco": "COCO JSON"}


def user_data_dir() -> Path:
    """Where default annotation projects go when no folder is open."""
    env = os.environ.get("CXRVIEWER_DATA_DIR") or os.environ.get("CXRVIEWER_CONFIG_DIR")
    if env:
        return Path(env)
    loc = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(loc) if loc else Path.home() / ".cxrviewer"


def default_annotator() -> str:
    name = settings.app_settings().value("annotation/annotator", "")
    if name:
        return str(name)
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


class AnnotationController(QObject):
    """See the module docstring. ``host`` gets the actions (and dock/menus via :meth:`attach`)."""

    storeChanged = Signal(object)  # AnnotationStore | None
    modeChanged = Signal(bool)
    studyRecordChanged = Signal(object)  # StudyRecord | None
    edited = Signal(object)  # the committed Edit (also undo/redo)
    message = Signal(str)
    bundleReady = Signal(str)

    POLL_MS = 2000

    def __init__(self, panel, state, host: QWidget, *, annotator: str | None = None,
                 registry: ShortcutRegistry | None = None) -> None:
        super().__init__(host)
        self.panel = panel
        self.state = state
        self.host = host
        self.annotator = annotator or default_annotator()
        self.registry = registry or registry_for(host)
        self.editor = BoxEditor(panel, self)
        self.dock = AnnotationDock()
        self.dock_widget: QDockWidget | None = None
        self.store: AnnotationStore | None = None
        self.undo_stack: UndoStack | None = None
        self.record: StudyRecord | None = None
        self.study = None
        self.prev_study_id: int | None = None
        self.clipboard: list[Box] = []
        self.clipboard_size: tuple[int, int] | None = None
        self.finetune_job: FineTuneJob | None = None
        self.auto_present = True
        self._mode = False
        self._lock: QLockFile | None = None
        self._shortcuts_dialog: ShortcutsDialog | None = None
        self.actions: dict[str, QAction] = {}
        self._make_actions()
        self._poll = QTimer(self)
        self._poll.setInterval(self.POLL_MS)
        self._poll.timeout.connect(self._poll_store)
        self._wire()
        self.editor.set_enabled(False)
        host.installEventFilter(self)

    # ---- construction ------------------------------------------------------------
    @classmethod
    def attach(cls, window: QWidget, **kwargs: Any) -> "AnnotationController":
        """Controller + dock + menus on a window exposing ``panel`` and ``state``."""
        ctrl = cls(window.panel, window.state, window, **kwargs)  # type: ignore[attr-defined]
        if isinstance(window, QMainWindow):
            ctrl.install_ui(window)
        inference = getattr(window, "inference", None)  # issue 5's InferenceController
        if inference is not None and hasattr(inference, "finished"):
            inference.finished.connect(ctrl._on_results)
        add_folder = getattr(window, "add_model_folder", None)  # kept in the settings, selected
        picker = getattr(window, "model_picker", None)
        if callable(add_folder):
            ctrl.bundleReady.connect(lambda path: add_folder(str(Path(path).parent)))
        elif picker is not None and hasattr(picker, "set_folders"):
            ctrl.bundleReady.connect(lambda path: show_bundle_in_picker(picker, path))
        return ctrl

    def _on_results(self, _sha: str, res: Any, _source: str = "") -> None:
        """Pipeline results -> dashed proposals (annotation mode only, current study only)."""
        boxes = getattr(res, "boxes", None)
        if (not self._mode or not boxes or self.study is None
                or getattr(res, "study_id", None) != self.study.study_id):
            return
        picker = getattr(self.host, "model_picker", None)
        folder = getattr(picker, "folder", "") if picker is not None else ""
        self.add_model_proposals(boxes, Path(folder).name if folder else "model")

    def _make_actions(self) -> None:
        slots: dict[str, Callable[..., Any]] = {
            "annot.mode": self.set_annotation_mode, "annot.draw": self.toggle_draw,
            "annot.delete": self.delete_selected, "annot.copy": self.copy_selected,
            "annot.paste": self.paste, "annot.duplicate": self.duplicate_selected,
            "annot.carry": self.carry_previous, "annot.undo": self.undo, "annot.redo": self.redo,
            "annot.next": lambda: self.state.step(1), "annot.prev": lambda: self.state.step(-1),
            "annot.done": self.toggle_done, "annot.accept": self.accept_proposal,
            "annot.reject": self.reject_proposal, "annot.class_menu": self.class_menu,
            "annot.class_next": lambda: self.step_class(1),
            "annot.class_prev": lambda: self.step_class(-1),
            "annot.select_next": lambda: self.editor.select_step(1),
            "annot.select_prev": lambda: self.editor.select_step(-1),
            "annot.cancel": self.editor.cancel, "annot.finetune": self.start_finetune_default,
            "annot.shortcuts": self.show_shortcuts,
        }
        for sid, text, keys, mode, desc in SHORTCUTS:
            act = QAction(text, self.host)
            act.setStatusTip(desc)
            act.setCheckable(sid == "annot.mode")
            slot = slots[sid]
            if sid == "annot.mode":
                act.toggled.connect(slot)
            else:
                act.triggered.connect(lambda _=False, s=slot: s())
            self.registry.register(sid, act, keys, desc, category="Annotation", mode=mode)
            self.actions[sid] = act
        self.registry.adopt_actions()  # the window's own keys: listed and rebindable too
        self._project_actions = {
            "new": QAction("&New annotation project…", self.host),
            "open": QAction("Open &annotation project…", self.host),
            "open_ro": QAction("Open annotation project &read-only…", self.host),
            "default": QAction("Open the &default annotation project", self.host),
            "close": QAction("Close annotation project", self.host),
        }
        pa = self._project_actions
        pa["new"].triggered.connect(self.new_store_dialog)
        pa["open"].triggered.connect(lambda: self.open_store_dialog(False))
        pa["open_ro"].triggered.connect(lambda: self.open_store_dialog(True))
        pa["default"].triggered.connect(lambda: self.ensure_store())
        pa["close"].triggered.connect(self.close_store)
        self.export_actions = {}
        for fmt, name in EXPORT_FORMATS.items():
            a = QAction(f"{name}…", self.host)
            a.triggered.connect(lambda _=False, f=fmt: self.export_dialog(f))
            self.export_actions[fmt] = a
        self.import_actions = {}
        for fmt, name in IMPORT_FORMATS.items():
            a = QAction(f"{name}…", self.host)
            a.triggered.connect(lambda _=False, f=fmt: self.import_dialog(f))
            self.import_actions[fmt] = a
        self._update_actions()

    def install_ui(self, window: QMainWindow) -> None:
        """Annotation dock (right), File-menu project/export/import entries, Annotate menu."""
        dock = QDockWidget("Annotations", window)
        dock.setObjectName("dock_annotations")
        dock.setWidget(self.dock)
        window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        beside = getattr(window, "findings_dock", None)  # share the right column as a tab
        if isinstance(beside, QDockWidget):
            window.tabifyDockWidget(beside, dock)
            self.modeChanged.connect(lambda on: dock.raise_() if on else None)
        self.dock_widget = dock
        mb = window.menuBar()
        menus = {a.text().replace("&", ""): a for a in mb.actions() if a.menu() is not None}
        file_menu = menus["File"].menu() if "File" in menus else mb.addMenu("&File")
        quit_act = next((a for a in file_menu.actions() if a.text().replace("&", "") == "Quit"), None)
        items: list[QAction | QMenu | None] = [None, *self._project_actions.values()]
        exp = QMenu("&Export annotations", window)
        exp.addActions(list(self.export_actions.values()))
        imp = QMenu("&Import annotations", window)
        imp.addActions(list(self.import_actions.values()))
        items += [exp, imp, None]
        for it in items:
            if it is None:
                file_menu.insertSeparator(quit_act) if quit_act else file_menu.addSeparator()
            elif isinstance(it, QMenu):
                file_menu.insertMenu(quit_act, it) if quit_act else file_menu.addMenu(it)
            else:
                file_menu.insertAction(quit_act, it) if quit_act else file_menu.addAction(it)
        ann = QMenu("&Annotate", window)
        groups = (("annot.mode", "annot.draw"), ("annot.undo", "annot.redo"),
                  ("annot.delete", "annot.copy", "annot.paste", "annot.duplicate", "annot.carry"),
                  ("annot.class_menu", "annot.class_next", "annot.class_prev", "annot.select_next",
                   "annot.select_prev", "annot.cancel"),
                  ("annot.accept", "annot.reject"), ("annot.done", "annot.next", "annot.prev"),
                  ("annot.finetune",))
        for g in groups:
            ann.addActions([self.actions[s] for s in g])
            ann.addSeparator()
        ann.addAction(dock.toggleViewAction())
        help_act = menus.get("Help")
        if help_act is not None:
            mb.insertMenu(help_act, ann)
            help_act.menu().addAction(self.actions["annot.shortcuts"])
        else:
            mb.addMenu(ann)
            ann.addAction(self.actions["annot.shortcuts"])
        self.annotate_menu = ann

    def _wire(self) -> None:
        self.state.studyChanged.connect(self._on_study_changed)
        ed = self.editor
        ed.drawRequested.connect(self._on_draw)
        ed.geometryRequested.connect(self._on_geometry)
        ed.selectionChanged.connect(self.dock.set_selection)
        ed.refused.connect(self._info)
        ed.drawModeChanged.connect(lambda _on: self._update_mode_text())
        d = self.dock
        d.selectionChosen.connect(self.editor.select)
        d.classChosen.connect(self.set_class)
        d.labelChosen.connect(self.set_label)
        d.statusChosen.connect(self.set_status)
        d.finetuneRequested.connect(self.start_finetune_default)
        d.cancelRequested.connect(self.cancel_finetune)

    # ---- messages ------------------------------------------------------------------
    def _info(self, text: str, timeout: int = 5000) -> None:
        log.info("%s", text)
        self.message.emit(text)
        sb = getattr(self.host, "statusBar", None)
        if callable(sb):
            sb().showMessage(text, timeout)

    def _error(self, text: str) -> None:
        log.warning("%s", text)
        self.message.emit(text)
        sb = getattr(self.host, "statusBar", None)
        if callable(sb):
            sb().showMessage(text, 10000)

    # ---- store ------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self.store is not None and not self.store.read_only

    def default_store_path(self) -> Path:
        """``<folder>.cxrann`` beside an opened folder, else ``default.cxrann`` in the data dir."""
        src = (self.state.worklist.source or "").strip()
        if src and "," not in src and Path(src).is_dir():
            folder = Path(src).resolve()
            if os.access(folder.parent, os.W_OK):
                return folder.parent / f"{folder.name}{SUFFIX}"
        return user_data_dir() / f"default{SUFFIX}"

    def ensure_store(self) -> bool:
        """Open the default project when none is open (so no drawn box is ever lost)."""
        if self.store is not None:
            return True
        path = self.default_store_path()
        ok = self.open_store(path)
        if ok:
            self._info(f"Annotations are saved in {path}")
        return ok

    def open_store(self, path: str | os.PathLike, *, read_only: bool = False,
                   create: bool = True) -> bool:
        """Open (or create) an annotation project; a second instance is told so."""
        self.close_store()
        path = Path(path)
        notice: list[str] = []
        lock = None
        if not read_only:
            lock = QLockFile(str(path) + ".lock")
            lock.setStaleLockTime(0)
            if not lock.tryLock(0):
                info = [v for v in lock.getLockInfo() if not isinstance(v, bool)]
                who = (f"process {info[0]} on {info[1]}" if len(info) >= 2 and info[0]
                       else "another program")
                notice.append(f"Also open in another cxrviewer ({who}). Both can edit safely: "
                              "every edit is committed at once, changes from the other window "
                              "appear here within seconds, and an undo that would overwrite "
                              "its work is refused.")
                lock = None
        try:
            store = AnnotationStore(path, annotator=self.annotator, read_only=read_only,
                                    create=create)
        except CxrError as exc:
            if lock is not None:
                lock.unlock()
            self._error(str(exc))
            return False
        if store.notice:
            notice.insert(0, store.notice[0].upper() + store.notice[1:])
        self.store = store
        self._lock = lock
        self.notice = " ".join(notice) or None
        self.undo_stack = UndoStack(store, on_change=lambda _s: self._update_actions())
        settings.app_settings().setValue("annotation/last_store", str(path))
        self.dock.set_store_info(str(path), self.notice)
        self._poll.start()
        self._sync_record()
        self._update_actions()
        self.storeChanged.emit(store)
        return True

    def close_store(self) -> None:
        if self.store is None:
            return
        self._poll.stop()
        self.editor.clear()
        self.store.close()
        self.store = None
        self.undo_stack = None
        self.record = None
        self.prev_study_id = None
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None
        self.dock.set_store_info(None)
        self.dock.show_study([], {}, None)
        self._update_actions()
        self.storeChanged.emit(None)

    def _poll_store(self) -> None:
        if self.store is not None and self.store.changed_elsewhere():
            self.refresh()

    def new_store_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.host, "New annotation project",
                                              str(self.default_store_path()),
                                              f"Annotation projects (*{SUFFIX})")
        if path:
            if not path.endswith(SUFFIX):
                path += SUFFIX
            if self.open_store(path):
                self.set_annotation_mode(True)

    def open_store_dialog(self, read_only: bool = False) -> None:
        path, _ = QFileDialog.getOpenFileName(self.host, "Open annotation project",
                                              str(self.default_store_path().parent),
                                              f"Annotation projects (*{SUFFIX});;All files (*)")
        if path and self.open_store(path, read_only=read_only, create=False):
            self.set_annotation_mode(True)

    # ---- studies ------------------------------------------------------------------------
    def _on_study_changed(self, study) -> None:
        self.editor.set_draw_mode(False)
        if self.record is not None and (study is None or study is not self.study):
            self.prev_study_id = self.record.id
        self.study = study
        self._sync_record()

    def _sync_record(self) -> None:
        rec = None
        if self.store is not None and self.study is not None:
            try:
                if self.store.read_only:
                    rec = self.store.find_study(StudyIdentity.from_study(self.study),
                                                path=self.study.meta.source_path)
                else:
                    rec = self.store.register_study(self.study)
            except CxrError as exc:
                self._error(f"annotation store: {exc}")
        self.record = rec
        self.studyRecordChanged.emit(rec)
        self.refresh()

    def refresh(self, select: Sequence[ItemKey] | None = None) -> None:
        """Redraw boxes, proposals, labels and status of the current study from the store.

        ``select``: the selection to show (default: keep what is still there).
        """
        if self.store is None or self.record is None:
            self.editor.clear()
            self.dock.show_study([], {}, None)
            self._update_actions()
            return
        sid = self.record.id
        try:
            self.record = self.store.study(sid)
            items = ([EditorItem.from_box(b) for b in self.store.boxes(sid)]
                     + [EditorItem.from_proposal(p) for p in self.store.proposals(sid, "pending")])
            labels = self.store.labels(sid)
        except CxrError as exc:
            self._error(str(exc))
            return
        self.editor.set_items(items, selected=select)
        self.dock.show_study(items, labels, self.record.status)
        self.dock.set_selection(self.editor.selected)
        self._update_actions()

    # ---- mode ----------------------------------------------------------------------------
    @property
    def annotation_mode(self) -> bool:
        return self._mode

    def set_annotation_mode(self, on: bool = True) -> None:
        on = bool(on)
        if on and not self.ensure_store():
            on = False
        if on != self._mode:
            self._mode = on
            self.registry.set_mode(ANNOTATE if on else None)
            self.modeChanged.emit(on)
        act = self.actions["annot.mode"]
        if act.isChecked() != on:
            act.blockSignals(True)
            act.setChecked(on)
            act.blockSignals(False)
        if not on:
            self.editor.set_draw_mode(False)
        self._update_actions()

    def _update_mode_text(self) -> None:
        if not self._mode:
            text = "view (E: annotate)"
        elif self.editor.draw_mode:
            text = f"drawing {self.editor.draw_label} (drag on the image, Esc cancels)"
        else:
            text = "annotate" + (" (read-only)" if not self.writable else "")
        self.dock.set_mode_text(text)

    def _update_actions(self) -> None:
        can_edit = self.writable and self.record is not None
        self.editor.set_enabled(self._mode and can_edit)
        self.dock.set_enabled(can_edit)
        u = self.undo_stack
        a = self.actions
        has = u is not None  # (an empty UndoStack is falsy: it has __len__)
        a["annot.undo"].setEnabled(bool(has and u.can_undo and self.writable))
        a["annot.redo"].setEnabled(bool(has and u.can_redo and self.writable))
        a["annot.undo"].setText(f"&Undo {u.undo_text}" if has and u.can_undo else "&Undo")
        a["annot.redo"].setText(f"&Redo {u.redo_text}" if has and u.can_redo else "&Redo")
        for sid in ("annot.delete", "annot.copy", "annot.paste", "annot.duplicate", "annot.carry",
                    "annot.done", "annot.accept", "annot.reject"):
            a[sid].setEnabled(can_edit or sid == "annot.copy")
        self._project_actions["close"].setEnabled(self.store is not None)
        for act in list(self.export_actions.values()) + list(self.import_actions.values()):
            act.setEnabled(self.store is not None and
                           (act in self.export_actions.values() or self.writable))
        self._update_mode_text()

    # ---- committing -----------------------------------------------------------------------
    def _can_edit(self) -> bool:
        if self.store is None and not self.ensure_store():
            return False
        if not self.writable:
            self._error("The annotation project is open read-only; nothing was changed.")
            return False
        if self.record is None:
            self._info("No study shown")
            return False
        return True

    def commit(self, description: str, fn: Callable[[AnnotationStore, int], Any], *,
               select_created: bool = False) -> Edit | None:
        """Run ``fn(store, study_id)`` as one transaction and one undo step.

        ``select_created``: select the boxes the edit created (drawn, pasted, accepted).
        """
        if not self._can_edit():
            return None
        store, sid = self.store, self.record.id  # type: ignore[union-attr]
        assert store is not None
        try:
            with store.batch(description) as b:
                fn(store, sid)
                if b._ops and store.study(sid).status == "unseen":
                    store.set_status(sid, "in_progress")
        except (InvalidBoxError, EditConflictError) as exc:
            self._error(f"{exc}")
            self.refresh()
            return None
        except CxrError as exc:
            self._error(f"Edit not saved: {exc}")
            self.refresh()
            return None
        edit = b.edit
        if edit is not None and not edit.empty and edit.id is not None:
            self.undo_stack.push(edit)  # type: ignore[union-attr]
            self.edited.emit(edit)
        created = self._created_boxes(edit) if select_created else None
        self.refresh(select=created or None)
        return edit

    @staticmethod
    def _created_boxes(edit: Edit | None) -> list[ItemKey]:
        if edit is None:
            return []
        return [("box", int(op.key)) for op in edit.ops if op.entity == "box" and op.action == "create"]

    # ---- drawing and geometry -------------------------------------------------------------
    def toggle_draw(self) -> None:
        if self.editor.draw_mode:
            self.editor.set_draw_mode(False)
            return
        if not self._mode:
            self.set_annotation_mode(True)
        if not self._can_edit():
            return
        self.editor.set_draw_mode(True)
        self._info(f"Draw a {self.editor.draw_label} box: left drag on the image (Esc cancels)", 3000)

    def _on_draw(self, label: str, x: float, y: float, w: float, h: float) -> Edit | None:
        def fn(store: AnnotationStore, sid: int) -> None:
            store.add_box(sid, label, x, y, w, h)
            if self.auto_present and store.labels(sid).get(label) is None:
                store.set_label(sid, label, "present")
        return self.commit(f"draw {label} box", fn, select_created=True)

    def add_box(self, label: str, x: float, y: float, w: float, h: float) -> Edit | None:
        """Programmatic draw (same path as a mouse-drawn box)."""
        return self._on_draw(label, x, y, w, h)

    def _on_geometry(self, kind: str, item_id: int, x: float, y: float, w: float, h: float) -> None:
        if kind == "box":
            self.commit("move/resize box", lambda st, _sid: st.update_box(item_id, x=x, y=y, w=w, h=h))
            return
        # dragging a proposal accepts it with the new geometry (provenance stays "model")
        def fn(store: AnnotationStore, _sid: int) -> None:
            e = store.accept_proposal(item_id)
            new = [int(op.key) for op in e.ops if op.entity == "box" and op.action == "create"]
            for bid in new:
                store.update_box(bid, x=x, y=y, w=w, h=h)
        self.commit("accept and adjust proposal", fn, select_created=True)

    # ---- selection-based edits ----------------------------------------------------------
    def _selected(self, kind: str) -> list[int]:
        return [i for k, i in self.editor.selected if k == kind]

    def delete_selected(self) -> None:
        boxes, props = self._selected("box"), self._selected("proposal")
        if not boxes and not props:
            self._info("Nothing selected")
            return

        def fn(store: AnnotationStore, _sid: int) -> None:
            for b in boxes:
                store.delete_box(b)
            for p in props:
                store.reject_proposal(p)
        n = len(boxes) + len(props)
        self.commit(f"delete {n} box{'es' if n > 1 else ''}", fn)

    def set_class(self, label: str) -> None:
        """Class of new boxes, and of the selected boxes/proposals-to-be."""
        if label not in CLASSES:
            return
        self.editor.draw_label = label
        self.dock.set_class(label)
        self._update_mode_text()
        boxes = self._selected("box")
        if boxes and self.writable:
            self.commit(f"class {label}", lambda st, _sid: [st.update_box(b, label=label) for b in boxes])

    def step_class(self, delta: int) -> None:
        i = CLASSES.index(self.editor.draw_label) if self.editor.draw_label in CLASSES else 0
        self.set_class(CLASSES[(i + delta) % len(CLASSES)])

    def class_menu(self) -> QMenu:
        """A popup with the 14 classes at the cursor (non-blocking)."""
        menu = QMenu(self.host)
        for i, name in enumerate(CLASSES):
            a = menu.addAction(f"&{i + 1:x}  {name}" if i < 15 else name)
            a.setCheckable(True)
            a.setChecked(name == self.editor.draw_label)
            a.triggered.connect(lambda _=False, n=name: self.set_class(n))
        menu.popup(QCursor.pos())
        return menu

    def copy_selected(self) -> None:
        items = [it for it in self.editor.items if it.key in set(self.editor.selected)]
        if not items:
            self._info("Nothing selected to copy")
            return
        self.clipboard = [Box(it.label, it.x, it.y, it.w, it.h) for it in items]
        shape = self.panel.image_shape
        self.clipboard_size = (shape[1], shape[0]) if shape else None
        try:
            QGuiApplication.clipboard().setText(json.dumps(
                [{"label": b.label, "x": b.x, "y": b.y, "w": b.w, "h": b.h} for b in self.clipboard]))
        except Exception:  # noqa: BLE001 - no system clipboard (offscreen)
            pass
        self._info(f"Copied {len(self.clipboard)} box(es)", 2000)

    def _add_boxes(self, boxes: Sequence[Box], description: str,
                   source_size: tuple[int, int] | None = None,
                   offset: tuple[float, float] = (0.0, 0.0)) -> Edit | None:
        if not boxes:
            return None
        sx = sy = 1.0
        if source_size and self.record is not None:
            sx = self.record.width / max(source_size[0], 1)
            sy = self.record.height / max(source_size[1], 1)

        def fn(store: AnnotationStore, sid: int) -> None:
            for b in boxes:
                try:
                    store.add_box(sid, b.label, b.x * sx + offset[0], b.y * sy + offset[1],
                                  b.w * sx, b.h * sy)
                except InvalidBoxError as exc:  # a pasted box wholly outside this image
                    log.info("skipped a box: %s", exc)
        return self.commit(description, fn, select_created=True)

    def paste(self) -> None:
        if not self.clipboard:
            self._info("Nothing to paste (Ctrl+C copies the selected boxes)")
            return
        self._add_boxes(self.clipboard, f"paste {len(self.clipboard)} box(es)", self.clipboard_size)

    def duplicate_selected(self) -> None:
        items = [it for it in self.editor.items if it.key in set(self.editor.selected)]
        if not items:
            self._info("Nothing selected to duplicate")
            return
        shape = self.panel.image_shape or (100, 100)
        off = max(4.0, 0.02 * shape[1])
        self._add_boxes([Box(it.label, it.x, it.y, it.w, it.h) for it in items],
                        f"duplicate {len(items)} box(es)", offset=(off, off))

    def carry_previous(self) -> None:
        """Copy the boxes of the previously shown study (scaled), skipping ones already here."""
        if self.store is None or self.prev_study_id is None:
            self._info("No previous study in this session to carry boxes from")
            return
        try:
            prev = self.store.study(self.prev_study_id)
            src = [b.to_box() for b in self.store.boxes(prev.id)]
        except CxrError as exc:
            self._error(str(exc))
            return
        if not src:
            self._info("The previous study has no boxes")
            return
        have = {(b.label, round(b.x), round(b.y), round(b.w), round(b.h))
                for b in (self.store.boxes(self.record.id) if self.record else [])}
        sx = (self.record.width / max(prev.width, 1)) if self.record else 1.0
        sy = (self.record.height / max(prev.height, 1)) if self.record else 1.0
        todo = [Box(b.label, b.x, b.y, b.w, b.h) for b in src
                if (b.label, round(b.x * sx), round(b.y * sy), round(b.w * sx), round(b.h * sy)) not in have]
        if not todo:
            self._info("The previous study's boxes are already here")
            return
        self._add_boxes(todo, f"carry {len(todo)} box(es)", (prev.width, prev.height))

    # ---- proposals ---------------------------------------------------------------------------
    def _target_proposals(self) -> list[int]:
        sel = self._selected("proposal")
        if sel:
            return sel
        first = next((it for it in self.editor.items if it.kind == "proposal"), None)
        return [first.id] if first else []

    def accept_proposal(self) -> None:
        props = self._target_proposals()
        if not props:
            self._info("No model proposal to accept")
            return
        self.commit(f"accept {len(props)} proposal(s)",
                    lambda st, _sid: [st.accept_proposal(p) for p in props], select_created=True)

    def reject_proposal(self) -> None:
        props = self._target_proposals()
        if not props:
            self._info("No model proposal to reject")
            return
        self.commit(f"reject {len(props)} proposal(s)",
                    lambda st, _sid: [st.reject_proposal(p) for p in props])

    def add_model_proposals(self, boxes: Mapping[str, Sequence[Box]] | Sequence[Box],
                            model_name: str) -> int:
        """Show a model's boxes (e.g. ``Results.boxes``: source -> boxes) as dashed proposals.

        Stored once per study and model name (``"<model>:<source>"`` for a mapping);
        a model already proposed for this study is skipped. Returns the number added.
        Not an undo step (the user did not make it).
        """
        if not self.writable or self.record is None:
            return 0
        groups = ({f"{model_name}:{k}": list(v) for k, v in boxes.items()}
                  if isinstance(boxes, Mapping) else {model_name: list(boxes)})
        sid = self.record.id
        try:
            seen = {p.model_name for p in self.store.proposals(sid)}  # type: ignore[union-attr]
            added = 0
            for name, bxs in groups.items():
                if name in seen or not bxs:
                    continue
                added += len(self.store.add_proposals(sid, bxs, name).ops)  # type: ignore[union-attr]
        except CxrError as exc:
            self._error(f"proposals not stored: {exc}")
            return 0
        self.refresh()
        return added

    # ---- labels and status ----------------------------------------------------------------
    def set_label(self, label: str, state: str | None) -> None:
        self.commit(f"{label}: {state or 'unset'}", lambda st, sid: st.set_label(sid, label, state))

    def set_status(self, status: str) -> None:
        self.commit(f"status {status}", lambda st, sid: st.set_status(sid, status))

    def toggle_done(self) -> None:
        if self.record is None:
            self._info("No study shown")
            return
        new = "in_progress" if self.record.status in ("done", "verified") else "done"
        self.set_status(new)
        if self.record is not None:
            self._info(f"Study marked {new.replace('_', ' ')} (D: next study)", 3000)

    # ---- undo / redo -----------------------------------------------------------------------
    def _undo_redo(self, forward: bool) -> Edit | None:
        u = self.undo_stack
        if u is None or not self.writable:
            return None
        try:
            edit = u.redo() if forward else u.undo()
        except (EditConflictError, CxrError) as exc:
            self._error(f"{'Redo' if forward else 'Undo'} refused: {exc}")
            self.refresh()
            return None
        if edit is None:
            self._info("Nothing to redo" if forward else "Nothing to undo", 2000)
            return None
        if self.record is not None and edit.study_ids and self.record.id not in edit.study_ids:
            self._info(f"{edit.description} (on another study)")
        self.edited.emit(edit)
        self.refresh()
        return edit

    def undo(self) -> Edit | None:
        return self._undo_redo(False)

    def redo(self) -> Edit | None:
        return self._undo_redo(True)

    # ---- exports / imports -------------------------------------------------------------------
    def export_to(self, fmt: str, target: str | os.PathLike, *,
                  include_identifiers: bool = False) -> Path | None:
        """Write an export (atomically; see :mod:`cxrviewer.core.annotations.export`)."""
        if self.store is None:
            self._info("No annotation project open")
            return None
        try:
            out = export_store(self.store, target, fmt, include_identifiers=include_identifiers)
        except CxrError as exc:
            self._error(f"Export failed: {exc}")
            return None
        self._info(f"Exported {EXPORT_FORMATS.get(fmt, fmt)} to {out}")
        return out

    def import_from(self, fmt: str, source: str | os.PathLike, **kwargs: Any) -> Edit | None:
        """Import boxes (one undo step); studies not opened yet are matched when opened."""
        if not self.writable:
            self._error("Open an annotation project for editing first")
            return None
        try:
            edit = IMPORTERS[fmt](self.store, source, **kwargs)
        except (CxrError, KeyError) as exc:
            self._error(f"Import failed: {exc}")
            return None
        if edit is not None and not edit.empty and edit.id is not None:
            self.undo_stack.push(edit)  # type: ignore[union-attr]
        self._info(f"Imported {len(edit.box_ids) if edit else 0} box(es) from {source}")
        self._sync_record()
        return edit

    def export_dialog(self, fmt: str) -> None:
        name = EXPORT_FORMATS[fmt]
        base = self.store.path.with_suffix("") if self.store else Path.home() / "annotations"
        if fmt in ("voc", "yolo"):
            target, _ = QFileDialog.getSaveFileName(self.host, f"Export {name} (a .zip or a folder name)",
                                                    f"{base}-{fmt}.zip", "Zip (*.zip);;Folder (*)")
        else:
            ext = ".json" if fmt == "coco" else ".csv"
            target, _ = QFileDialog.getSaveFileName(self.host, f"Export {name}", f"{base}-{fmt}{ext}",
                                                    f"{name} (*{ext})")
        if target:
            self.export_to(fmt, target)

    def import_dialog(self, fmt: str) -> None:
        filt = "COCO JSON (*.json)" if fmt == "coco" else "CSV (*.csv *.csv.gz)"
        source, _ = QFileDialog.getOpenFileName(self.host, f"Import {IMPORT_FORMATS[fmt]}",
                                                settings.last_dir(), f"{filt};;All files (*)")
        if source:
            self.import_from(fmt, source)

    # ---- fine-tuning --------------------------------------------------------------------------
    def finetune_dir(self) -> Path:
        """Where new bundles go: a model-set folder of their own (``<data dir>/finetuned``)."""
        return user_data_dir() / "finetuned"

    def start_finetune(self, *, out: str | os.PathLike | None = None, command: str = "cia",
                       data: str | os.PathLike | None = None, extra: Sequence[str] = (),
                       program: str | None = None, args: Sequence[str] | None = None,
                       env: dict[str, str] | None = None) -> FineTuneJob | None:
        """Run ``cxr-train <command> --data DIR --annotations STORE --out OUT …`` in a separate process.

        ``data`` defaults to the opened folder when it is a folder. ``args``/``program``
        replace the whole command line (tests, custom trainers). Progress goes to the
        dock; ``bundleReady(path)`` when the new bundle exists.
        """
        if self.finetune_job is not None and self.finetune_job.running:
            self._info("A fine-tuning run is already going (Cancel stops it)")
            return None
        if self.store is None:
            self._error("Open an annotation project first")
            return None
        if out is None:
            out = self.finetune_dir() / f"finetuned-{time.strftime('%Y%m%d-%H%M%S')}.cxrbundle"
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        if args is None:
            if data is None:
                src = (self.state.worklist.source or "").strip()
                data = src if src and "," not in src and Path(src).is_dir() else None
            if data is None:
                self._error("Fine-tuning needs a training folder (NIH layout): open one, or set "
                            "finetune/data in the settings")
                return None
            args = finetune_arguments(self.store.path, out, command=command, data=data, extra=extra)
        job = FineTuneJob(args, out, program=program, env=env, parent=self)
        job.progress.connect(lambda f, t: self.dock.set_progress(None if f < 0 else f, t))
        job.bundleReady.connect(self._on_bundle_ready)
        job.failed.connect(self._on_finetune_failed)
        self.finetune_job = job
        self.dock.set_progress(None, "starting…")
        job.start()
        self._info("Fine-tuning started in a separate process; the viewer stays usable")
        return job

    def start_finetune_default(self) -> None:
        """Menu entry; settings ``finetune/command`` (cia), ``finetune/data``, ``finetune/extra_args``
        (a JSON list, e.g. ``["--backbone", "resnet18", "--epochs", "5"]``)."""
        st = settings.app_settings()
        try:
            extra = json.loads(str(st.value("finetune/extra_args", "[]")))
        except ValueError:
            extra = []
        data = st.value("finetune/data", "") or None
        self.start_finetune(command=str(st.value("finetune/command", "cia")),
                            data=str(data) if data else None, extra=[str(e) for e in extra])

    def cancel_finetune(self) -> None:
        if self.finetune_job is not None and self.finetune_job.running:
            self.finetune_job.cancel()
            self._info("Cancelling fine-tuning…")

    def _on_bundle_ready(self, path: str) -> None:
        self.dock.set_progress(1.0, "new bundle ready", running=False)
        self._info(f"Fine-tuned bundle ready: {path}")
        self.bundleReady.emit(path)

    def _on_finetune_failed(self, message: str) -> None:
        self.dock.set_progress(0.0, "cancelled" if "cancel" in message else "failed", running=False)
        self._error(message.splitlines()[0] if message else "fine-tuning failed")
        if "\n" in message:
            log.warning("%s", message)

    # ---- help / lifecycle -------------------------------------------------------------------
    def show_shortcuts(self) -> ShortcutsDialog:
        self.registry.adopt_actions()
        if self._shortcuts_dialog is None:
            self._shortcuts_dialog = ShortcutsDialog(self.registry, self.host)
        self._shortcuts_dialog.refresh()
        self._shortcuts_dialog.show()
        self._shortcuts_dialog.raise_()
        return self._shortcuts_dialog

    def shutdown(self) -> None:
        """Stop training (cancel + wait) and close the store (every edit is already saved)."""
        job = self.finetune_job
        if job is not None and job.running:
            job.cancel()
            if not job.wait(job.KILL_AFTER_MS + 1000):
                job.proc.kill()
                job.wait(2000)
        if self._shortcuts_dialog is not None:
            self._shortcuts_dialog.close()
        self.close_store()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt naming
        if obj is self.host and event.type() == QEvent.Type.Close:
            self.shutdown()
        return False


def show_bundle_in_picker(picker: Any, path: str) -> None:
    """Offer the new bundle's folder in the model picker and select it."""
    combo = getattr(picker, "combo", None)
    folders = [str(combo.itemData(i)) for i in range(combo.count())] if combo is not None else []
    folder = str(Path(path).parent)
    if folder not in folders:
        folders.append(folder)
    picker.set_folders(folders, current=folder)


def shortcuts_markdown(registry: ShortcutRegistry | None = None) -> str:
    """The annotation shortcuts as a Markdown table (for the README)."""
    lines = ["| Keys | Action | When |", "|---|---|---|"]
    for sid, _text, keys, mode, desc in SHORTCUTS:
        k = registry.keys(sid) if registry is not None and sid in registry else list(keys)
        lines.append(f"| {' / '.join(k) or '(menu)'} | {desc} | {'annotation mode' if mode else 'always'} |")
    return "\n".join(lines)
