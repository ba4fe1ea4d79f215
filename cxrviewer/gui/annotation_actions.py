"""The annotation actions (registered, rebindable keys), their menus and when they are enabled.

:data:`SHORTCUTS` is the table of every annotation action; the README table is generated
from it (:func:`shortcuts_markdown`). The window says where the menu entries go
(:meth:`AnnotationActions.install`): project, export and import entries in its File menu
before a given action, an Annotate menu before its Help menu, and the shortcut editor in
the Help menu.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMainWindow, QMenu, QWidget

from ..core.annotations import UndoStack
from .annotation_io import EXPORT_FORMATS, IMPORT_FORMATS
from .shortcuts import ShortcutRegistry, ShortcutsDialog

#: The registry mode in which the editing keys are live.
ANNOTATE = "annotate"
#: On/off actions: their slot gets the checked state.
CHECKABLE = ("annot.mode", "annot.all_classes", "annot.view_proposals")

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
    ("annot.all_classes", "Proposals of &every class", ("Shift+C",), None,
     "show the model proposals of every class (default: the best 3 of the current class)"),
    ("annot.view_proposals", "Proposals outside annotation mode", (), None,
     "show the model proposals in view mode too"),
    ("annot.class_menu", "&Class…", ("C",), ANNOTATE, "choose the class (of the selection and of new boxes)"),
    ("annot.class_next", "Next class", ("]",), ANNOTATE, "next class"),
    ("annot.class_prev", "Previous class", ("[",), ANNOTATE, "previous class"),
    ("annot.select_next", "Select next box", ("S",), ANNOTATE, "select the next box/proposal"),
    ("annot.select_prev", "Select previous box", ("Shift+S",), ANNOTATE, "select the previous box/proposal"),
    ("annot.cancel", "Cancel drawing / clear selection", ("Esc",), ANNOTATE, "cancel drawing, else clear the selection"),
    ("annot.finetune", "&Fine-tune on my annotations…", (), None, "train a new bundle from this project"),
    ("annot.shortcuts", "Keyboard shortcuts (edit)…", ("Ctrl+/",), None, "list and rebind every shortcut"),
)

#: (id, menu text) of the project entries (File menu).
PROJECT_ACTIONS: tuple[tuple[str, str], ...] = (
    ("new", "&New annotation project…"),
    ("open", "Open &annotation project…"),
    ("open_ro", "Open annotation project &read-only…"),
    ("default", "Open the &default annotation project"),
    ("close", "Close annotation project"),
)

#: The Annotate menu, in separated groups.
MENU_GROUPS: tuple[tuple[str, ...], ...] = (
    ("annot.mode", "annot.draw"), ("annot.undo", "annot.redo"),
    ("annot.delete", "annot.copy", "annot.paste", "annot.duplicate", "annot.carry"),
    ("annot.class_menu", "annot.class_next", "annot.class_prev", "annot.select_next",
     "annot.select_prev", "annot.cancel"),
    ("annot.accept", "annot.reject", "annot.all_classes", "annot.view_proposals"),
    ("annot.done", "annot.next", "annot.prev"),
    ("annot.finetune",),
)

#: Enabled only with a writable project and a study shown (copy: always).
EDIT_ACTIONS = ("annot.delete", "annot.copy", "annot.paste", "annot.duplicate", "annot.carry",
                "annot.done", "annot.accept", "annot.reject")


def _connected(text: str, parent: QWidget, slot: Callable[[], Any]) -> QAction:
    act = QAction(text, parent)
    act.triggered.connect(lambda _=False: slot())
    return act


class AnnotationActions:
    """The QActions of the annotation tools on ``host`` (see the module docstring).

    ``slots``: SHORTCUTS id -> callable (those of :data:`CHECKABLE` get the checked state);
    ``project``: PROJECT_ACTIONS id -> callable; ``export``/``import_``: called with a format.
    """

    def __init__(self, host: QWidget, registry: ShortcutRegistry,
                 slots: Mapping[str, Callable[..., Any]], project: Mapping[str, Callable[[], Any]],
                 export: Callable[[str], Any], import_: Callable[[str], Any]) -> None:
        self.host = host
        self.registry = registry
        self.actions: dict[str, QAction] = {}
        for sid, text, keys, mode, desc in SHORTCUTS:
            act = QAction(text, host)
            act.setStatusTip(desc)
            act.setCheckable(sid in CHECKABLE)
            slot = slots[sid]
            if sid in CHECKABLE:
                act.toggled.connect(slot)
            else:
                act.triggered.connect(lambda _=False, s=slot: s())
            registry.register(sid, act, keys, desc, category="Annotation", mode=mode)
            self.actions[sid] = act
        registry.adopt_actions()  # the window's own keys: listed and rebindable too
        self.project = {pid: _connected(text, host, project[pid]) for pid, text in PROJECT_ACTIONS}
        self.export = {f: _connected(f"{name}…", host, lambda f=f: export(f))
                       for f, name in EXPORT_FORMATS.items()}
        self.imports = {f: _connected(f"{name}…", host, lambda f=f: import_(f))
                        for f, name in IMPORT_FORMATS.items()}
        self.annotate_menu: QMenu | None = None
        self._shortcuts_dialog: ShortcutsDialog | None = None

    # ---- state ----------------------------------------------------------------------
    def set_mode_checked(self, on: bool) -> None:
        """Show the annotation mode without triggering it again."""
        self.set_checked("annot.mode", on)

    def set_checked(self, sid: str, on: bool) -> None:
        """Show an on/off action's state without triggering it."""
        act = self.actions[sid]
        if act.isChecked() != on:
            act.blockSignals(True)
            act.setChecked(on)
            act.blockSignals(False)

    def update(self, *, can_edit: bool, writable: bool, has_store: bool,
               undo: UndoStack | None) -> None:
        """Enable what can run now; undo/redo name the edit they would undo/redo."""
        a = self.actions
        can_undo = undo is not None and undo.can_undo  # (an empty UndoStack is falsy)
        can_redo = undo is not None and undo.can_redo
        a["annot.undo"].setEnabled(can_undo and writable)
        a["annot.redo"].setEnabled(can_redo and writable)
        a["annot.undo"].setText(f"&Undo {undo.undo_text}" if can_undo else "&Undo")  # type: ignore[union-attr]
        a["annot.redo"].setText(f"&Redo {undo.redo_text}" if can_redo else "&Redo")  # type: ignore[union-attr]
        for sid in EDIT_ACTIONS:
            a[sid].setEnabled(can_edit or sid == "annot.copy")
        self.project["close"].setEnabled(has_store)
        for act in self.export.values():
            act.setEnabled(has_store)
        for act in self.imports.values():
            act.setEnabled(has_store and writable)

    # ---- menus ------------------------------------------------------------------------
    def install(self, window: QMainWindow, dock_toggle: QAction, *, file_menu: QMenu | None = None,
                before: QAction | None = None, help_menu: QMenu | None = None) -> QMenu:
        """Put the entries in the window's menus (see the module docstring); returns Annotate.

        Without ``file_menu`` the project entries go to the end of the Annotate menu,
        without ``help_menu`` the shortcut editor too.
        """
        ann = QMenu("&Annotate", window)
        for group in MENU_GROUPS:
            ann.addActions([self.actions[s] for s in group])
            ann.addSeparator()
        ann.addAction(dock_toggle)
        exp = QMenu("&Export annotations", window)
        exp.addActions(list(self.export.values()))
        imp = QMenu("&Import annotations", window)
        imp.addActions(list(self.imports.values()))
        target, at = (file_menu, before) if file_menu is not None else (ann, None)
        target.insertSeparator(at)
        target.insertActions(at, list(self.project.values()))
        target.insertMenu(at, exp)
        target.insertMenu(at, imp)
        target.insertSeparator(at)
        bar = window.menuBar()
        if help_menu is not None:
            bar.insertMenu(help_menu.menuAction(), ann)
            help_menu.addAction(self.actions["annot.shortcuts"])
        else:
            bar.addMenu(ann)
            ann.addAction(self.actions["annot.shortcuts"])
        self.annotate_menu = ann
        return ann

    # ---- shortcut editor ----------------------------------------------------------------
    def show_shortcuts(self) -> ShortcutsDialog:
        """The non-modal shortcut list/editor (every registered action, the window's too)."""
        self.registry.adopt_actions()
        if self._shortcuts_dialog is None:
            self._shortcuts_dialog = ShortcutsDialog(self.registry, self.host)
        self._shortcuts_dialog.refresh()
        self._shortcuts_dialog.show()
        self._shortcuts_dialog.raise_()
        return self._shortcuts_dialog

    def close_dialogs(self) -> None:
        if self._shortcuts_dialog is not None:
            self._shortcuts_dialog.close()


def shortcuts_markdown(registry: ShortcutRegistry | None = None) -> str:
    """The annotation shortcuts as a Markdown table (for the README)."""
    lines = ["| Keys | Action | When |", "|---|---|---|"]
    for sid, _text, keys, mode, desc in SHORTCUTS:
        k = registry.keys(sid) if registry is not None and sid in registry else list(keys)
        lines.append(f"| {' / '.join(k) or '(menu)'} | {desc} | {'annotation mode' if mode else 'always'} |")
    return "\n".join(lines)
