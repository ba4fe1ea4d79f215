"""Annotation project files: default places, the annotator's name, the cross-process lock,
and the export/import/project file dialogs with their messages.

Default projects live in the user's data folder (:func:`user_data_dir`, Qt's
``AppDataLocation``), one per opened folder (``projects/<folder>-<hash>.cxrann``) or
``default.cxrann``: never beside the opened folder, so never inside the installation or a
checkout (e.g. ``resources/demo``). A project an earlier version made beside a user's own
folder is still found there.

A new project asks for its label set (:meth:`AnnotationIO.choose_label_set`). An import
whose classes the project's label set cannot map opens :class:`LabelMappingDialog` (each
unmapped class: one of the project's labels, "add to the project's labels" or "skip") and
runs again with the choices; cancelled, it is refused with a message listing the classes.

"DICOM SR + GSPS" exports a folder per study (``SR.dcm``, ``PR.dcm``, ``SC.dcm`` for a
non-DICOM image), "DICOM SEG" a folder per study of SEGs (lung/heart masks from the study's
stored analysis, a results file beside the image or in the app's results cache, else from the
bundled segmentation model; thresholded and fractional finding maps when the analysis has them),
and "DICOM SR / GSPS / SEG" imports one such file, with the code of
``cxrviewer annotations export/import`` (:mod:`cxrviewer.core.dicom_objects.exchange` and
:mod:`cxrviewer.core.seg_export`, loaded on first use); the images an SR references are found
in the project or, by SOP Instance UID, among the DICOM files beside it.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QLockFile, QObject, QStandardPaths, Qt, Signal
from PySide6.QtWidgets import (QApplication, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QInputDialog, QLabel, QMessageBox, QVBoxLayout, QWidget)

from ..core.annotations import SUFFIX, AnnotationSession, Edit, EditRefused, UnmappedClassesError
from ..core.errors import CxrError
from ..core.labelsets import BUILTIN, LabelSet, get_label_set
from . import settings
from .annotation_feedback import AnnotationFeedback
from .workers import JobRunner

EXPORT_FORMATS = {"coco": "COCO JSON", "coco-results": "COCO results (model proposals)",
                  "voc": "Pascal VOC (VOCdevkit)", "yolo": "YOLO (Ultralytics dataset)",
                  "nih-csv": "NIH csv", "dicom": "DICOM SR + GSPS",
                  "dicom-seg": "DICOM SEG (lung/heart masks, finding maps)"}
IMPORT_FORMATS = {"nih-csv": "NIH csv (BBox_List_2017 layout)", "coco": "COCO JSON",
                  "dicom-sr": "DICOM SR / GSPS / SEG"}
#: the formats of :mod:`cxrviewer.core.dicom_objects.exchange` (imported on first use, ~1 s)
DICOM_FORMATS = ("dicom", "dicom-sr", "gsps", "dicom-seg")
PROJECT_FILTER = f"Annotation projects (*{SUFFIX})"


def user_data_dir() -> Path:
    """Where default annotation projects (and fine-tuned bundles) go when no folder is open."""
    env = os.environ.get("CXRVIEWER_DATA_DIR") or os.environ.get("CXRVIEWER_CONFIG_DIR")
    if env:
        return Path(env)
    loc = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(loc) if loc else Path.home() / ".cxrviewer"


def default_annotator() -> str:
    """The ``annotation/annotator`` setting, else the login name."""
    name = settings.app_settings().value("annotation/annotator", "")
    if name:
        return str(name)
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


def opened_folder(source: str | None) -> Path | None:
    """The worklist's source when it is one folder (not files, not a list), else None."""
    src = (source or "").strip()
    return Path(src) if src and "," not in src and Path(src).is_dir() else None


def app_roots() -> list[Path]:
    """The installation: the frozen app's folder, the checkout (or site-packages) holding the
    package, and the Python prefix."""
    roots = [Path(__file__).resolve().parents[2], Path(sys.prefix).resolve()]
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        roots.append(Path(frozen).resolve())
    return roots


def inside_app(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside the installation or the checkout (:func:`app_roots`)."""
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in app_roots())


def default_store_path(source: str | None) -> Path:
    """The default project of an opened folder, ``<data>/projects/<folder>-<hash>.cxrann``
    (a ``<folder>.cxrann`` an earlier version made beside a user's folder is kept), else
    ``<data>/default.cxrann`` (``<data>``: :func:`user_data_dir`)."""
    folder = opened_folder(source)
    if folder is None:
        return user_data_dir() / f"default{SUFFIX}"
    folder = folder.resolve()
    beside = folder.parent / f"{folder.name}{SUFFIX}"
    if beside.is_file() and not inside_app(beside):
        return beside
    digest = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:8]
    return user_data_dir() / "projects" / f"{folder.name}-{digest}{SUFFIX}"


def project_lock(path: Path) -> tuple[Callable[[], None] | None, str | None]:
    """Lock a project for this process: (release, None), or (None, a notice) if another has it."""
    lock = QLockFile(str(path) + ".lock")
    lock.setStaleLockTime(0)
    if lock.tryLock(0):
        return lock.unlock, None
    info = [v for v in lock.getLockInfo() if not isinstance(v, bool)]
    who = f"process {info[0]} on {info[1]}" if len(info) >= 2 and info[0] else "another program"
    return None, (f"Also open in another cxrviewer ({who}). Both can edit safely: every edit is "
                  "committed at once, changes from the other window appear here within seconds, "
                  "and an undo that would overwrite its work is refused.")


#: the choices of :class:`LabelMappingDialog` besides the project's labels
ADD, SKIP = "add to the project's labels", "skip (leave its boxes out)"


class LabelMappingDialog(QDialog):
    """Where each class of an import goes: a project label, ADD (extend the label set) or SKIP.

    :meth:`choices` gives ``(mapping, add_unknown)`` for the importers' keywords.
    """

    def __init__(self, unmapped: Sequence[str], labels: Sequence[str], label_set_title: str,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Map the imported classes")
        lay = QVBoxLayout(self)
        note = QLabel(f"These classes of the file are not in the project's label set "
                      f"{label_set_title}. Choose where each goes:")
        note.setWordWrap(True)
        lay.addWidget(note)
        form = QFormLayout()
        self.combos: dict[str, QComboBox] = {}
        for name in unmapped:
            combo = QComboBox()
            combo.addItems([ADD, SKIP, *labels])
            form.addRow(name, combo)
            self.combos[name] = combo
        lay.addLayout(form)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Import")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)

    def choose(self, name: str, choice: str) -> None:
        """Set one class's choice (a project label, :data:`ADD` or :data:`SKIP`)."""
        self.combos[name].setCurrentText(choice)

    def choices(self) -> tuple[dict[str, str | None], bool]:
        """``(mapping, add_unknown)``: ``{class: project label or None (skip)}``; the classes
        left out of ``mapping`` are the ones to add."""
        mapping: dict[str, str | None] = {}
        add = False
        for name, combo in self.combos.items():
            text = combo.currentText()
            if text == ADD:
                add = True
            else:
                mapping[name] = None if text == SKIP else text
        return mapping, add


def ask_mapping(parent: QWidget, unmapped: Sequence[str], label_set: LabelSet
                ) -> tuple[dict[str, str | None], bool] | None:
    """Run :class:`LabelMappingDialog`; None when cancelled."""
    dlg = LabelMappingDialog(unmapped, label_set.labels, label_set.display_name, parent)
    return dlg.choices() if dlg.exec() == QDialog.DialogCode.Accepted else None


def _said(result: Any) -> tuple[Path, str]:
    """A DICOM export's folder and its summary (with the first skipped study, if any)."""
    said = result.summary()
    if result.skipped:
        said += f" (first: {result.skipped[0][0]}: {result.skipped[0][1]})"
    return result.folder, f"({said})"


class AnnotationIO(QObject):
    """Exports, imports and the project file dialogs of one window.

    ``imported(Edit)`` after an import changed the project (the shown study may now
    have boxes).
    """

    imported = Signal(object)
    #: the file or folder an export wrote (a DICOM SEG export's when its worker finished)
    exported = Signal(object)

    def __init__(self, session: AnnotationSession, feedback: AnnotationFeedback,
                 parent: QWidget) -> None:
        super().__init__(parent)
        self.session = session
        self.feedback = feedback
        self.parent_widget = parent
        #: ``fn(parent, unmapped, label_set) -> (mapping, add_unknown) or None`` (tests replace it)
        self.ask_mapping: Callable[..., tuple[dict[str, str | None], bool] | None] = ask_mapping
        self._jobs: JobRunner | None = None
        self._seg_seq = 0

    # ---- exports / imports ----------------------------------------------------------
    def export_to(self, fmt: str, target: str | os.PathLike, *,
                  include_identifiers: bool = False) -> Path | None:
        """Write an export (atomically); None (and a message) when it failed. DICOM SEG runs in
        the background (:meth:`_start_seg_export`): None now, :attr:`exported` when written."""
        if fmt == "dicom-seg":
            self._start_seg_export(target)
            return None
        try:
            if fmt in DICOM_FORMATS:
                out, said = self._export_dicom(fmt, target)
            else:
                out = self.session.export_to(fmt, target, include_identifiers=include_identifiers)
                said = f"to {out}"
        except EditRefused as exc:
            self.feedback.refused(exc)
            return None
        except CxrError as exc:
            self.feedback.error(f"Export failed: {exc}")
            return None
        self.feedback.info(f"Exported {EXPORT_FORMATS.get(fmt, fmt)} {said}")
        self.exported.emit(out)
        return out

    def _export_dicom(self, fmt: str, target: str | os.PathLike) -> tuple[Path, str]:
        """A DICOM export of the whole project: (folder, what to say)."""
        from ..core.dicom_objects.exchange import EXPORT_KINDS, export_dicom

        if self.session.store is None:
            raise EditRefused("No annotation project open")
        return _said(export_dicom(self.session.store, target, kinds=EXPORT_KINDS[fmt]))

    # ---- the background DICOM SEG export ---------------------------------------------
    @property
    def exporting(self) -> bool:
        """A DICOM SEG export is running (its result not delivered yet)."""
        return self._seg_seq != 0

    def _start_seg_export(self, target: str | os.PathLike) -> None:
        """Start the DICOM SEG export on a worker thread: it may run the segmentation model
        (~1 s a study), so the window stays usable; the store is thread-safe and the export is
        written to a temporary folder renamed into place (cxrviewer/core/dicom_objects/exchange.py)."""
        from ..core.seg_export import export_dicom_seg
        from .inference import results_cache_dir

        store = self.session.store
        if store is None:
            self.feedback.refused(EditRefused("No annotation project open"))
            return
        if self.exporting:
            self.feedback.refused(EditRefused("A DICOM SEG export is already running"))
            return
        if self._jobs is None:
            self._jobs = JobRunner(self)
            self._jobs.finished.connect(self._seg_done)
            self._jobs.failed.connect(self._seg_failed)
        self.feedback.info("Exporting DICOM SEG in the background (the segmentation model runs on "
                           "studies without stored masks)…")
        QApplication.setOverrideCursor(Qt.CursorShape.BusyCursor)
        self._seg_seq = self._jobs.submit("export-seg", export_dicom_seg, store, target,
                                          results=[results_cache_dir()])

    def _seg_finish(self, seq: int) -> bool:
        if seq != self._seg_seq:
            return False
        self._seg_seq = 0
        QApplication.restoreOverrideCursor()
        return True

    def _seg_done(self, channel: str, seq: int, result: Any) -> None:
        if self._seg_finish(seq):
            out, said = _said(result)
            self.feedback.info(f"Exported {EXPORT_FORMATS['dicom-seg']} {said}")
            self.exported.emit(out)

    def _seg_failed(self, channel: str, seq: int, message: str, exc: object) -> None:
        if self._seg_finish(seq):
            self.feedback.error(f"Export failed: {message}")

    def wait_for_export(self, timeout_ms: int = 600_000) -> bool:
        """Block until a running DICOM SEG export is written (before the project closes) and
        deliver its message; True when none is left running."""
        if self._jobs is None or not self.exporting:
            return True
        return self._jobs.wait(timeout_ms)

    def import_from(self, fmt: str, source: str | os.PathLike, **kwargs: Any) -> Edit | None:
        """Import boxes (one undo step); studies not opened yet are matched when opened.

        Classes the project's labels lack: :attr:`ask_mapping` (the mapping dialog), then the
        import again with the choices; cancelled, the import is refused (nothing written).
        """
        notes: list[str] = []
        if fmt in DICOM_FORMATS:
            from ..core.dicom_objects.exchange import register_formats

            register_formats()  # the session's importers then include them
            kwargs.setdefault("studies_dir", Path(source).parent)
            kwargs.setdefault("notes", notes)
        try:
            try:
                edit = self.session.import_from(fmt, source, **kwargs)
            except UnmappedClassesError as exc:
                chosen = self.ask_mapping(self.parent_widget, list(exc.unmapped), self.session.label_set)
                if chosen is None:
                    raise
                mapping, add = chosen
                edit = self.session.import_from(fmt, source, **{**kwargs, "mapping": mapping,
                                                                 "add_unknown": add})
        except EditRefused as exc:
            self.feedback.refused(exc)
            return None
        except (CxrError, KeyError) as exc:
            self.feedback.error(f"Import failed: {exc}")
            return None
        self.feedback.info(f"Imported {len(edit.box_ids) if edit else 0} box(es) from {source}"
                           + "".join(f"; {n}" for n in dict.fromkeys(notes)))
        self.imported.emit(edit)
        return edit

    # ---- dialogs ----------------------------------------------------------------------
    def export_dialog(self, fmt: str) -> None:
        """Ask where the ``fmt`` export goes, then :meth:`export_to` there."""
        name = EXPORT_FORMATS[fmt]
        store = self.session.store
        base = store.path.with_suffix("") if store else Path.home() / "annotations"
        if fmt in ("voc", "yolo"):
            title, ext, filt = (f"Export {name} (a .zip or a folder name)", ".zip",
                                "Zip (*.zip);;Folder (*)")
        elif fmt in DICOM_FORMATS:
            title, ext, filt = f"Export {name} (a new folder: one folder per study)", "", "Folder (*)"
        else:
            ext = ".json" if fmt in ("coco", "coco-results") else ".csv"
            title, filt = f"Export {name}", f"{name} (*{ext})"
        target, _ = QFileDialog.getSaveFileName(self.parent_widget, title, f"{base}-{fmt}{ext}", filt)
        if target:
            self.export_to(fmt, target)

    def import_dialog(self, fmt: str) -> None:
        """Ask for a file to import as ``fmt``, then :meth:`import_from` it."""
        filt = {"coco": "COCO JSON (*.json)", "dicom-sr": "DICOM SR, GSPS or SEG (*.dcm)"}.get(
            fmt, "CSV (*.csv *.csv.gz)")
        source, _ = QFileDialog.getOpenFileName(self.parent_widget, f"Import {IMPORT_FORMATS[fmt]}",
                                                settings.last_dir(), f"{filt};;All files (*)")
        if source:
            self.import_from(fmt, source)

    def new_project_path(self, default: Path) -> str | None:
        """Ask where a new project goes (the suffix is added); None when cancelled."""
        path, _ = QFileDialog.getSaveFileName(self.parent_widget, "New annotation project",
                                              str(default), PROJECT_FILTER)
        if not path:
            return None
        return path if path.endswith(SUFFIX) else path + SUFFIX

    def choose_label_set(self) -> LabelSet | None:
        """Ask a new project's label set: a built-in one or a user's .json/.txt file; None:
        cancelled (or the file could not be read: said so)."""
        titles = {f"{ls.display_name} ({name})": name for name, ls in BUILTIN.items()}
        from_file = "From a file (.json or .txt)…"
        item, ok = QInputDialog.getItem(self.parent_widget, "New annotation project",
                                        "Label set (the classes of its boxes and labels):",
                                        [*titles, from_file], 0, False)
        if not ok:
            return None
        if item != from_file:
            return get_label_set(titles[item])
        path, _ = QFileDialog.getOpenFileName(self.parent_widget, "Label set file", settings.last_dir(),
                                              "Label sets (*.json *.txt);;All files (*)")
        if not path:
            return None
        try:
            return get_label_set(path)
        except CxrError as exc:
            self.feedback.error(f"Label set not used: {exc}")
            return None

    def choose_project(self, default: Path) -> str | None:
        """No project open: ask "new", "open" or "default" (``default`` is its path); None:
        cancelled."""
        box = QMessageBox(QMessageBox.Icon.Question, "Annotation project",
                          "Boxes and labels are saved in an annotation project. Create or open one?",
                          QMessageBox.StandardButton.Cancel, self.parent_widget)
        box.setInformativeText(f"The default project for these studies is {default}")
        role = QMessageBox.ButtonRole.AcceptRole
        buttons = {"new": box.addButton("New project…", role), "open": box.addButton("Open project…", role),
                   "default": box.addButton("Use default project", role)}
        box.setDefaultButton(buttons["default"])
        box.exec()
        clicked = box.clickedButton()
        return next((k for k, b in buttons.items() if b is clicked), None)

    def open_project_path(self, folder: Path) -> str | None:
        """Ask for an existing project; None when cancelled."""
        path, _ = QFileDialog.getOpenFileName(self.parent_widget, "Open annotation project",
                                              str(folder), f"{PROJECT_FILTER};;All files (*)")
        return path or None
