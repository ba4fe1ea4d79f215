"""Annotation edit commands: editor gestures, keys and dock choices -> session edits -> redraw.

Each command is one :class:`~cxrviewer.core.annotations.AnnotationSession` edit (one
store transaction, one undo step); :meth:`AnnotationEdits.run` reports a refused or
failed edit and redraws the box editor and the dock from the store, so the screen
always shows what is saved.

Which pending proposals are shown is a display choice (the store keeps them all): the
current class's best :attr:`AnnotationEdits.top_k` (:func:`cxrviewer.core.proposals.select_proposals`),
every class's with :attr:`AnnotationEdits.all_classes`, none when :attr:`AnnotationEdits.show_proposals`
is off (view mode). Accept, reject and select-next act on the shown ones.

Classes are the open project's label set (:attr:`AnnotationEdits.labels`): the class chooser
(dock combo, C menu, [ ]), the dock's image-label rows and the class of new boxes follow it.
A proposal whose class the project's labels lack is shown but refused on accept; choosing a
class while it is selected accepts it as that class (the mapping).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QCursor
from PySide6.QtWidgets import QMenu, QWidget

from ..core.annotations import (
    AnnotationSession, Edit, EditRefused, InvalidBoxError, created_box_ids, is_committed,
)
from ..core.errors import AnnotationConflictError, CxrError
from ..core.geometry import Box
from ..core.proposals import select_proposals
from .annotation_feedback import AnnotationFeedback
from .views.box_editor import BoxEditor, EditorItem, ItemKey
from .widgets.annotations import AnnotationDock


class AnnotationEdits(QObject):
    """The edit commands of one box editor + dock (see the module docstring).

    ``edited(Edit)`` after every committed edit (undo/redo too); ``refreshed()`` after
    each redraw from the store. ``menu_parent`` owns the class popup menu.
    """

    edited = Signal(object)
    refreshed = Signal()

    #: proposals shown per class (the best by :func:`select_proposals`)
    top_k = 3

    def __init__(self, session: AnnotationSession, editor: BoxEditor, dock: AnnotationDock,
                 feedback: AnnotationFeedback, menu_parent: QWidget,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.editor = editor
        self.dock = dock
        self.feedback = feedback
        self.menu_parent = menu_parent
        #: every class's proposals (else only those of the class of new boxes)
        self.all_classes = False
        #: whether proposals are shown at all (the controller: annotation mode, or asked for)
        self.show_proposals = True
        # the dock's list follows on the next turn of the event loop, so that a mouse release
        # returns after the commit and the editor's redraw (benchmarks/box_editor_stall.py)
        self._dock_rows: tuple[list[EditorItem], dict, str | None] | None = None
        self._dock_timer = QTimer(self)
        self._dock_timer.setSingleShot(True)
        self._dock_timer.setInterval(0)
        self._dock_timer.timeout.connect(self._show_dock)
        # a mouse gesture's redraw from the store follows on the next turn as well: the release
        # handler commits and returns (the box stays drawn where the gesture left it), so no
        # single handler holds the GUI for the commit, the redraw and a repaint together
        self._redraw_select: Sequence[ItemKey] | None = None
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(0)
        self._redraw_timer.timeout.connect(self._deferred_refresh)

    @property
    def labels(self) -> tuple[str, ...]:
        """The open project's labels (the NIH 14 when none is open)."""
        try:
            return self.session.label_set.labels
        except CxrError:
            return self.dock.labels

    def sync_labels(self) -> None:
        """Show the project's labels in the dock; the class of new boxes stays one of them."""
        try:
            ls = self.session.label_set
        except CxrError as exc:
            self.feedback.error(str(exc))
            return
        self.dock.set_labels(ls.labels, ls.display_name)
        if self.editor.draw_label not in ls.labels:
            self.editor.set_draw_label(ls.labels[0])
        else:
            self.dock.set_class(self.editor.draw_label)

    # ---- running and redrawing ----------------------------------------------------------
    def run(self, op: Callable[..., Edit], *args: Any, select_created: bool = False,
            defer_redraw: bool = False) -> Edit | None:
        """Run one session edit, report why not if it was refused or failed, redraw.

        ``select_created``: select the boxes the edit created (drawn, pasted, accepted).
        ``defer_redraw``: the redraw of a committed edit follows on the next event-loop turn
        (mouse gestures; :meth:`flush_view` does it at once).
        """
        try:
            edit = op(*args)
        except EditRefused as exc:
            self.feedback.refused(exc)
            self.refresh()  # (a gesture's refused geometry goes back to the store's)
            return None
        except (InvalidBoxError, AnnotationConflictError) as exc:  # conflict: redraw = reload
            self.feedback.error(str(exc))
            self.refresh()
            return None
        except CxrError as exc:
            self.feedback.error(f"Edit not saved: {exc}")
            self.refresh()
            return None
        if is_committed(edit):
            self.edited.emit(edit)
        created = [("box", b) for b in created_box_ids(edit)] if select_created else []
        if defer_redraw:
            self._redraw_select = created or None
            self._redraw_timer.start()
        else:
            self.refresh(select=created or None)
        return edit

    def refresh(self, select: Sequence[ItemKey] | None = None) -> None:
        """Redraw boxes, proposals, labels and status of the shown study from the store.

        ``select``: the selection to show (default: a deferred gesture's, else keep what is
        still there).
        """
        self._redraw_timer.stop()
        select, self._redraw_select = (self._redraw_select if select is None else select), None
        try:
            snap = self.session.snapshot()
        except CxrError as exc:
            self.feedback.error(str(exc))
            return
        self.sync_labels()
        if snap is None:
            self.editor.clear()
            self._dock_rows = ([], {}, None)
        else:
            items = ([EditorItem.from_box(b) for b in snap.boxes]
                     + [EditorItem.from_proposal(p) for p in self.visible_proposals(snap.proposals)])
            self.editor.set_items(items, selected=select)
            self._dock_rows = (items, dict(snap.labels), snap.record.status)
        self._dock_timer.start()
        self.refreshed.emit()

    def flush_view(self) -> None:
        """Show the last edit now: the editor's redraw after a gesture and the dock's list (else
        they follow on the next event-loop turn)."""
        if self._redraw_timer.isActive():
            self.refresh()
        self._show_dock()

    def _deferred_refresh(self) -> None:
        self.refresh()

    def _show_dock(self) -> None:
        self._dock_timer.stop()
        rows, self._dock_rows = self._dock_rows, None
        if rows is not None:
            self.dock.show_study(*rows)
            self.dock.set_selection(self.editor.selected)

    def visible_proposals(self, proposals: Sequence[Any]) -> list[Any]:
        """The pending proposals to show (see the module docstring), best first per class."""
        if not self.show_proposals:
            return []
        groups: dict[str, list[Any]] = {}
        for p in proposals:
            groups.setdefault(p.model_name, []).append(p)
        classes = None if self.all_classes else [self.editor.draw_label]
        rec = self.session.record
        shape = None if rec is None else (int(rec.height), int(rec.width))
        return [p for _, p in select_proposals(groups, classes=classes, top_k=self.top_k, image_shape=shape)]

    def set_proposal_view(self, *, all_classes: bool | None = None, shown: bool | None = None) -> None:
        """Change which proposals are shown (display only) and redraw."""
        if all_classes is not None:
            self.all_classes = bool(all_classes)
        if shown is not None:
            self.show_proposals = bool(shown)
        self.refresh()

    def selected(self, kind: str) -> list[int]:
        """Ids of the selected boxes (``"box"``) or proposals (``"proposal"``)."""
        return [i for k, i in self.editor.selected if k == kind]

    def selected_boxes(self) -> list[Box]:
        """The selected items as plain boxes (copy, duplicate)."""
        keys = set(self.editor.selected)
        return [Box(it.label, it.x, it.y, it.w, it.h) for it in self.editor.items if it.key in keys]

    # ---- boxes ---------------------------------------------------------------------------
    def draw(self, label: str, x: float, y: float, w: float, h: float) -> Edit | None:
        """A drawn box (the editor's ``drawRequested``; also for code: same path)."""
        return self.run(self.session.draw_box, label, x, y, w, h, select_created=True)

    def apply_geometry(self, kind: str, item_id: int, x: float, y: float, w: float, h: float, *,
                       defer_redraw: bool = False) -> None:
        """A move/resize ended; dragging a proposal accepts it with the new geometry."""
        if kind == "box":
            self.run(self.session.move_box, item_id, x, y, w, h, defer_redraw=defer_redraw)
        else:
            self.run(self.session.accept_adjusted, item_id, x, y, w, h, select_created=True,
                     defer_redraw=defer_redraw)

    def gesture_draw(self, label: str, x: float, y: float, w: float, h: float) -> None:
        """The editor's ``drawRequested``: committed now, redrawn on the next event-loop turn."""
        self.run(self.session.draw_box, label, x, y, w, h, select_created=True, defer_redraw=True)

    def gesture_geometry(self, kind: str, item_id: int, x: float, y: float, w: float, h: float) -> None:
        """The editor's ``geometryRequested``: committed now, redrawn on the next event-loop turn."""
        self.apply_geometry(kind, item_id, x, y, w, h, defer_redraw=True)

    def delete_selected(self) -> None:
        self.run(self.session.delete, self.selected("box"), self.selected("proposal"))

    def set_class(self, label: str) -> None:
        """Class of new boxes, and of the selected boxes; selected proposals are accepted as it."""
        labels = self.labels
        if label not in labels:
            return
        self.editor.set_draw_label(label)
        boxes, props = self.selected("box"), self.selected("proposal")
        if props and self.session.writable:
            self.run(self.session.accept_proposals, props, label, select_created=True)
        if boxes and self.session.writable:
            self.run(self.session.relabel, boxes, label)
        elif not props:
            self.refresh()  # the new class's proposals

    def step_class(self, delta: int) -> None:
        labels = self.labels
        label = self.editor.draw_label
        i = labels.index(label) if label in labels else 0
        self.set_class(labels[(i + delta) % len(labels)])

    def class_menu(self) -> QMenu:
        """A popup with the project's classes at the cursor (non-blocking)."""
        menu = QMenu(self.menu_parent)
        for i, name in enumerate(self.labels):
            a = menu.addAction(f"&{i + 1:x}  {name}" if i < 15 else name)
            a.setCheckable(True)
            a.setChecked(name == self.editor.draw_label)
            a.triggered.connect(lambda _=False, n=name: self.set_class(n))
        menu.popup(QCursor.pos())
        return menu

    # ---- proposals ---------------------------------------------------------------------
    def shown_proposals(self) -> list[int]:
        """The selected proposals, else the first shown one (never a hidden one)."""
        selected = self.selected("proposal")
        if selected:
            return selected
        first = next((it.id for it in self.editor.items if it.kind == "proposal"), None)
        return [] if first is None else [first]

    def _no_proposal(self, verb: str) -> None:
        which = "" if self.all_classes else f"{self.editor.draw_label} "
        self.feedback.info(f"No {which}model proposal shown to {verb}"
                           + ("" if self.all_classes else " (Annotate > Proposals of every class)"), 3000)

    def accept_proposal(self) -> None:
        ids = self.shown_proposals()
        if not ids:
            self._no_proposal("accept")
            return
        self.run(self.session.accept_proposals, ids, select_created=True)

    def reject_proposal(self) -> None:
        ids = self.shown_proposals()
        if not ids:
            self._no_proposal("reject")
            return
        self.run(self.session.reject_proposals, ids)

    def add_model_proposals(self, boxes: Mapping[str, Sequence[Box]] | Sequence[Box],
                            model_name: str) -> int:
        """Show a model's boxes (source -> boxes, or a list) as dashed proposals.

        Stored once per study and model name; not an undo step. Returns the number added.
        """
        try:
            added = self.session.add_proposals(boxes, model_name)
            ls = self.session.label_set
        except CxrError as exc:
            self.feedback.error(f"proposals not stored: {exc}")
            return 0
        self.refresh()
        flat = [b for bxs in boxes.values() for b in bxs] if isinstance(boxes, Mapping) else list(boxes)
        unmapped = sorted({b.label for b in flat if b.label not in ls})
        if added and unmapped:
            self.feedback.info(f"Model classes not in the project's labels ({ls.display_name}): "
                               f"{', '.join(unmapped)}. Their proposals show with Shift+C; select one "
                               "and choose a class to accept it as that class", 8000)
        return added

    # ---- labels and status ------------------------------------------------------------------
    def set_label(self, label: str, state: str | None) -> None:
        self.run(self.session.set_label, label, state)

    def set_status(self, status: str) -> None:
        self.run(self.session.set_status, status)

    def toggle_done(self) -> None:
        """Done <-> in progress."""
        edit = self.run(self.session.toggle_done)
        record = self.session.record
        if edit is not None and record is not None:
            self.feedback.info(f"Study marked {record.status.replace('_', ' ')} (D: next study)", 3000)

    # ---- undo / redo -----------------------------------------------------------------------
    def undo(self) -> Edit | None:
        return self._undo_redo(False)

    def redo(self) -> Edit | None:
        return self._undo_redo(True)

    def _undo_redo(self, forward: bool) -> Edit | None:
        if not self.session.writable:
            return None
        try:
            edit = self.session.redo() if forward else self.session.undo()
        except CxrError as exc:  # EditConflictError: another window changed the rows
            self.feedback.error(f"{'Redo' if forward else 'Undo'} refused: {exc}")
            self.refresh()
            return None
        if edit is None:
            self.feedback.info("Nothing to redo" if forward else "Nothing to undo", 2000)
            return None
        if self.session.elsewhere(edit):
            self.feedback.info(f"{edit.description} (on another study)")
        self.edited.emit(edit)
        self.refresh()
        return edit
