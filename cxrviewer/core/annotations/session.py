"""An annotation session: one open project, its undo history, the shown study and its edits.

Qt-free: the GUI (:mod:`cxrviewer.gui.annotation_controller`) turns gestures, keys and
menu entries into the calls below and redraws from :meth:`AnnotationSession.snapshot`::

    session = AnnotationSession("alice")
    session.open("project.cxrann")
    session.set_study(study)                       # registers it in the project
    edit = session.draw_box("Mass", 10, 20, 30, 40)
    session.undo()

Every edit method runs as **one** store transaction and **one** undo step and returns
the committed :class:`~cxrviewer.core.annotations.Edit` (empty when nothing changed).
A study's first edit also moves its review status from *unseen* to *in progress* in
the same transaction, and a drawn box marks its class *present* if the image label
was unset (:attr:`AnnotationSession.auto_present`).

Errors: :class:`EditRefused` when there is nothing to do or editing is off (its
``level`` says how to show it); :class:`~cxrviewer.core.annotations.InvalidBoxError`,
:class:`~cxrviewer.core.errors.AnnotationConflictError` (another editor changed a row
since :meth:`AnnotationSession.snapshot` read it: show the message and redraw, which
reloads the study; :class:`~cxrviewer.core.annotations.EditConflictError` for undo/redo)
or another :class:`~cxrviewer.core.errors.CxrError` when the store refuses (nothing was
written).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CxrError
from ..geometry import Box
from ..labelsets import DEFAULT, LabelSet
from .export import IMPORTERS, export_store
from .model import AnnotatedBox, Edit, InvalidBoxError, Proposal, StudyIdentity, StudyRecord
from .durability import DurableFn, ErrorFn, WalSyncer
from .store import AnnotationStore, UndoStack

log = logging.getLogger(__name__)

#: ``lock(path) -> (release, notice)``: take the project's cross-process lock; ``release``
#: is None when the lock is held elsewhere, ``notice`` then tells the user so.
Locker = Callable[[Path], tuple[Callable[[], None] | None, str | None]]
#: ``fn(store, study_id) -> the parts' edits`` run inside one batch by :meth:`AnnotationSession.commit`.
EditFn = Callable[[AnnotationStore, int], Iterable[Edit]]


class EditRefused(CxrError):
    """An edit that was not attempted: nothing to act on, no study, read-only project.

    ``level``: ``"info"`` (nothing to do), ``"error"`` (not possible now) or ``"quiet"``
    (already reported, e.g. the default project could not be opened).
    """

    def __init__(self, message: str, *, level: str = "info") -> None:
        super().__init__(message)
        self.level = level


@dataclass(frozen=True)
class StudySnapshot:
    """What the GUI draws for the current study, read from the store in one go."""

    record: StudyRecord
    boxes: list[AnnotatedBox]
    proposals: list[Proposal]  # pending ones only
    labels: dict[str, str]


@dataclass
class BoxClipboard:
    """Copied boxes and the (width, height) of the image they were copied from."""

    boxes: list[Box] = field(default_factory=list)
    size: tuple[int, int] | None = None

    def copy(self, boxes: Iterable[Box], size: tuple[int, int] | None) -> int:
        """Replace the content; returns the number of boxes copied."""
        self.boxes = list(boxes)
        self.size = size
        return len(self.boxes)

    def to_json(self) -> str:
        """The boxes as JSON text (for the system clipboard)."""
        return json.dumps([{"label": b.label, "x": b.x, "y": b.y, "w": b.w, "h": b.h}
                           for b in self.boxes])

    def __len__(self) -> int:
        return len(self.boxes)


def proposals_from_results(results: Any, study_id: str) -> dict[str, list[Box]]:
    """A model run's boxes (source -> boxes) when the pipeline ``results`` belong to
    ``study_id``, else {}.

    The one place that reads boxes out of pipeline results for annotation.
    """
    if not results.boxes or results.study_id != study_id:
        return {}
    return {str(source): list(bxs) for source, bxs in results.boxes.items()}


def created_box_ids(edit: Edit | None) -> list[int]:
    """Ids of the boxes an edit created (drawn, pasted, accepted)."""
    if edit is None:
        return []
    return [int(op.key) for op in edit.ops if op.entity == "box" and op.action == "create"]


def is_committed(edit: Edit | None) -> bool:
    """True for an edit that changed something (an undo step)."""
    return edit is not None and not edit.empty and edit.id is not None


def _plural(n: int) -> str:
    return f"{n} box{'es' if n > 1 else ''}"


class AnnotationSession:
    """One open annotation project and the study shown (see the module docstring).

    ``lock``: cross-process lock of a writable project (see :data:`Locker`).
    ``open_default``: called when an edit finds no project open; returns whether
    one is open now. ``on_history``: called whenever the undo/redo stacks change.
    """

    def __init__(self, annotator: str | None = None, *, lock: Locker | None = None,
                 open_default: Callable[[], bool] | None = None,
                 on_history: Callable[[], None] | None = None) -> None:
        self.annotator = annotator
        self.auto_present = True
        self.store: AnnotationStore | None = None
        self.undo_stack: UndoStack | None = None
        self.record: StudyRecord | None = None
        self.study: Any = None  # cxrviewer.core.study.Study
        self.prev_study_id: int | None = None
        self.notice: str | None = None
        self._locker = lock
        self._release: Callable[[], None] | None = None
        self._open_default = open_default
        self._on_history = on_history
        #: background fsync thread (``open(background_sync=True)``), else None
        self.syncer: WalSyncer | None = None

    # ---- project lifecycle ------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self.store is not None and not self.store.read_only

    def open(self, path: str | os.PathLike, *, read_only: bool = False,
             create: bool = True, background_sync: bool = False,
             on_durable: DurableFn | None = None,
             on_sync_error: ErrorFn | None = None,
             label_set: LabelSet | str | None = None) -> AnnotationStore:
        """Open (or create) a project, closing the current one; raises CxrError.

        ``label_set``: the label set of a new project (default ``nih14``; see
        :class:`~cxrviewer.core.annotations.AnnotationStore`).

        ``background_sync``: commit with ``synchronous=NORMAL`` (no fsync on the caller's
        thread) and let a :class:`WalSyncer` thread fsync after each commit, calling
        ``on_durable(ticket)`` / ``on_sync_error(ticket, exc)`` from that thread.
        Call :meth:`sync_record` next to register the shown study in it.
        """
        self.close()
        path = Path(path)
        release, lock_notice = (None, None)
        if not read_only and self._locker is not None:
            release, lock_notice = self._locker(path)
        try:
            store = AnnotationStore(path, annotator=self.annotator, read_only=read_only,
                                    create=create, label_set=label_set,
                                    synchronous="NORMAL" if background_sync else "FULL")
        except CxrError:
            if release is not None:
                release()
            raise
        notes = [store.notice[0].upper() + store.notice[1:]] if store.notice else []
        self.notice = " ".join(notes + ([lock_notice] if lock_notice else [])) or None
        self.store, self._release = store, release
        if background_sync and not store.read_only:
            self.syncer = WalSyncer(store.path, on_durable, on_sync_error)
            store.on_commit = self.syncer.submit
        self.undo_stack = UndoStack(store, on_change=lambda _stack: self._history_changed())
        return store

    def close(self) -> bool:
        """Close the project (every edit is already committed); False if none was open."""
        if self.store is None:
            return False
        if self.syncer is not None:  # every acknowledged edit reaches the disk first
            self.syncer.close()
            self.syncer = None
        self.store.close()
        self.store = self.undo_stack = self.record = self.prev_study_id = None
        if self._release is not None:
            self._release()
            self._release = None
        return True

    @property
    def label_set(self) -> LabelSet:
        """The open project's label set (``nih14`` when none is open)."""
        return self.store.label_set if self.store is not None else DEFAULT

    def add_labels(self, names: Sequence[str]) -> LabelSet:
        """Add ``names`` to the project's label set (not an undo step); the new set."""
        if not self.writable:
            raise EditRefused("Open an annotation project for editing first", level="error")
        assert self.store is not None
        return self.store.add_labels(names)

    def changed_elsewhere(self) -> bool:
        """True once after another instance committed to this project."""
        return self.store is not None and self.store.changed_elsewhere()

    def _history_changed(self) -> None:
        if self._on_history is not None:
            self._on_history()

    # ---- the shown study ----------------------------------------------------------
    def set_study(self, study: Any) -> StudyRecord | None:
        """The study now shown (None: none); the previous one is remembered for carrying."""
        if self.record is not None and (study is None or study is not self.study):
            self.prev_study_id = self.record.id
        self.study = study
        return self.sync_record()

    def sync_record(self) -> StudyRecord | None:
        """Find (read-only) or register the shown study in the project; raises CxrError."""
        self.record = None
        if self.store is None or self.study is None:
            return None
        if self.store.read_only:
            self.record = self.store.find_study(StudyIdentity.from_study(self.study),
                                                path=self.study.meta.source_path)
        else:
            self.record = self.store.register_study(self.study)
        return self.record

    def snapshot(self) -> StudySnapshot | None:
        """Boxes, pending proposals, labels and status of the shown study (None: nothing)."""
        if self.store is None or self.record is None:
            return None
        sid = self.record.id
        self.record = self.store.study(sid)
        return StudySnapshot(self.record, self.store.boxes(sid),
                             self.store.proposals(sid, "pending"), self.store.labels(sid))

    # ---- committing ----------------------------------------------------------------
    def check_editable(self) -> tuple[AnnotationStore, int]:
        """The store and study id to edit, opening the default project if none is open."""
        if self.store is None:
            opened = self._open_default is not None and self._open_default()
            if not opened:
                raise EditRefused("No annotation project open",
                                  level="quiet" if self._open_default else "error")
        if not self.writable:
            raise EditRefused("The annotation project is open read-only; nothing was changed.",
                              level="error")
        if self.record is None:
            raise EditRefused("No study shown")
        assert self.store is not None
        return self.store, self.record.id

    def commit(self, description: str, fn: EditFn) -> Edit:
        """Run ``fn(store, study_id)`` as one transaction and one undo step."""
        store, sid = self.check_editable()
        with store.batch(description) as batch:
            parts = list(fn(store, sid))
            if any(not p.empty for p in parts) and store.study(sid).status == "unseen":
                store.set_status(sid, "in_progress")
        edit = batch.edit
        assert edit is not None
        if is_committed(edit):
            assert self.undo_stack is not None
            self.undo_stack.push(edit)
        self._reload_record()
        return edit

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every commit so far is durable (True at once without background sync)."""
        return self.syncer is None or self.syncer.flush(timeout)

    def _reload_record(self) -> None:
        """Re-read the shown study's row (its review status may have changed)."""
        if self.store is not None and self.record is not None:
            self.record = self.store.study(self.record.id)

    # ---- boxes -------------------------------------------------------------------------
    def draw_box(self, label: str, x: float, y: float, w: float, h: float) -> Edit:
        """A drawn box; its class becomes *present* if unset (and :attr:`auto_present`)."""
        def fn(store: AnnotationStore, sid: int) -> list[Edit]:
            parts = [store.add_box(sid, label, x, y, w, h)]
            if self.auto_present and store.labels(sid).get(label) is None:
                parts.append(store.set_label(sid, label, "present"))
            return parts
        return self.commit(f"draw {label} box", fn)

    def move_box(self, box_id: int, x: float, y: float, w: float, h: float) -> Edit:
        return self.commit("move/resize box",
                           lambda st, _sid: [st.update_box(box_id, x=x, y=y, w=w, h=h)])

    def accept_adjusted(self, proposal_id: int, x: float, y: float, w: float, h: float) -> Edit:
        """Accept a proposal with a new geometry (a dragged proposal; provenance stays "model")."""
        def fn(store: AnnotationStore, _sid: int) -> list[Edit]:
            accepted = store.accept_proposal(proposal_id)
            return [accepted] + [store.update_box(b, x=x, y=y, w=w, h=h)
                                 for b in created_box_ids(accepted)]
        return self.commit("accept and adjust proposal", fn)

    def delete(self, box_ids: Sequence[int], proposal_ids: Sequence[int] = ()) -> Edit:
        """Delete boxes and reject proposals (the selection)."""
        if not box_ids and not proposal_ids:
            raise EditRefused("Nothing selected")

        def fn(store: AnnotationStore, _sid: int) -> list[Edit]:
            return ([store.delete_box(b) for b in box_ids]
                    + [store.reject_proposal(p) for p in proposal_ids])
        return self.commit(f"delete {_plural(len(box_ids) + len(proposal_ids))}", fn)

    def relabel(self, box_ids: Sequence[int], label: str) -> Edit:
        return self.commit(f"class {label}",
                           lambda st, _sid: [st.update_box(b, label=label) for b in box_ids])

    def add_boxes(self, boxes: Sequence[Box], description: str,
                  source_size: tuple[int, int] | None = None,
                  offset: tuple[float, float] = (0.0, 0.0)) -> Edit:
        """Add boxes scaled from an image of ``source_size`` (w, h) and shifted by ``offset``.

        A box wholly outside this image is skipped (logged).
        """
        sx = sy = 1.0
        if source_size and self.record is not None:
            sx = self.record.width / max(source_size[0], 1)
            sy = self.record.height / max(source_size[1], 1)

        def fn(store: AnnotationStore, sid: int) -> list[Edit]:
            parts = []
            for b in boxes:
                try:
                    parts.append(store.add_box(sid, b.label, b.x * sx + offset[0],
                                               b.y * sy + offset[1], b.w * sx, b.h * sy))
                except InvalidBoxError as exc:
                    log.info("skipped a box: %s", exc)
            return parts
        return self.commit(description, fn)

    def paste(self, clipboard: BoxClipboard) -> Edit:
        if not clipboard.boxes:
            raise EditRefused("Nothing to paste (Ctrl+C copies the selected boxes)")
        n = len(clipboard.boxes)
        return self.add_boxes(clipboard.boxes, f"paste {n} box(es)", clipboard.size)

    def duplicate(self, boxes: Sequence[Box], offset: tuple[float, float]) -> Edit:
        if not boxes:
            raise EditRefused("Nothing selected to duplicate")
        return self.add_boxes(boxes, f"duplicate {len(boxes)} box(es)", offset=offset)

    def carry_previous(self) -> Edit:
        """Copy the previously shown study's boxes here (scaled), skipping ones already here."""
        if self.store is None or self.prev_study_id is None:
            raise EditRefused("No previous study in this session to carry boxes from")
        try:
            prev = self.store.study(self.prev_study_id)
            src = [b.to_box() for b in self.store.boxes(prev.id)]
        except CxrError as exc:
            raise EditRefused(str(exc), level="error") from exc
        if not src:
            raise EditRefused("The previous study has no boxes")
        rec = self.record
        have = {(b.label, round(b.x), round(b.y), round(b.w), round(b.h))
                for b in (self.store.boxes(rec.id) if rec else [])}
        sx = rec.width / max(prev.width, 1) if rec else 1.0
        sy = rec.height / max(prev.height, 1) if rec else 1.0
        todo = [b for b in src if (b.label, round(b.x * sx), round(b.y * sy), round(b.w * sx),
                                   round(b.h * sy)) not in have]
        if not todo:
            raise EditRefused("The previous study's boxes are already here")
        return self.add_boxes(todo, f"carry {len(todo)} box(es)", (prev.width, prev.height))

    # ---- proposals --------------------------------------------------------------------
    def target_proposals(self, selected: Sequence[int]) -> list[int]:
        """The selected proposals, else the first pending one of the shown study."""
        if selected:
            return list(selected)
        if self.store is None or self.record is None:
            return []
        first = next(iter(self.store.proposals(self.record.id, "pending")), None)
        return [first.id] if first is not None else []

    def accept_proposals(self, selected: Sequence[int] = (), label: str | None = None) -> Edit:
        """Accept the selected (else the first) proposals as boxes with the model's provenance.

        ``label``: accept them as this project label (maps a model class the project's label
        set lacks; else such a proposal is refused with
        :class:`~cxrviewer.core.annotations.store.UnmappedProposalError`).
        """
        return self._decide(selected, "accept", label)

    def reject_proposals(self, selected: Sequence[int] = ()) -> Edit:
        """Reject the selected (else the first) proposals."""
        return self._decide(selected, "reject")

    def _decide(self, selected: Sequence[int], verb: str, label: str | None = None) -> Edit:
        props = self.target_proposals(selected)
        if not props:
            raise EditRefused(f"No model proposal to {verb}")

        def fn(store: AnnotationStore, _sid: int) -> list[Edit]:
            if verb == "accept":
                return [store.accept_proposal(p, label) for p in props]
            return [store.reject_proposal(p) for p in props]
        return self.commit(f"{verb} {len(props)} proposal(s)", fn)

    def add_proposals(self, boxes: Mapping[str, Sequence[Box]] | Sequence[Box],
                      model_name: str) -> int:
        """Store a model's boxes as pending proposals; returns the number added.

        ``boxes``: source -> boxes (stored as ``"<model>:<source>"``) or one list.
        A model name already proposed for this study is skipped. Not an undo step
        (the user did not make it). Nothing happens without a writable project and study.
        """
        if not self.writable or self.record is None:
            return 0
        assert self.store is not None
        groups = ({f"{model_name}:{k}": list(v) for k, v in boxes.items()}
                  if isinstance(boxes, Mapping) else {model_name: list(boxes)})
        sid = self.record.id
        seen = {p.model_name for p in self.store.proposals(sid)}
        return sum(len(self.store.add_proposals(sid, bxs, name).ops)
                   for name, bxs in groups.items() if name not in seen and bxs)

    # ---- labels and status -------------------------------------------------------------
    def set_label(self, label: str, state: str | None) -> Edit:
        return self.commit(f"{label}: {state or 'unset'}",
                           lambda st, sid: [st.set_label(sid, label, state)])

    def set_status(self, status: str) -> Edit:
        return self.commit(f"status {status}", lambda st, sid: [st.set_status(sid, status)])

    def toggle_done(self) -> Edit:
        """Done (or verified) -> in progress, else -> done."""
        if self.record is None:
            raise EditRefused("No study shown")
        return self.set_status("in_progress" if self.record.status in ("done", "verified")
                               else "done")

    # ---- undo / redo ----------------------------------------------------------------------
    def undo(self) -> Edit | None:
        """Undo the last edit of this session (None: nothing to undo or read-only)."""
        return self._step(forward=False)

    def redo(self) -> Edit | None:
        """Redo the last undone edit (None: nothing to redo or read-only)."""
        return self._step(forward=True)

    def _step(self, *, forward: bool) -> Edit | None:
        if self.undo_stack is None or not self.writable:
            return None
        edit = self.undo_stack.redo() if forward else self.undo_stack.undo()
        self._reload_record()
        return edit

    def elsewhere(self, edit: Edit) -> bool:
        """True when ``edit`` touched studies but not the shown one."""
        return (self.record is not None and bool(edit.study_ids)
                and self.record.id not in edit.study_ids)

    # ---- exports / imports ------------------------------------------------------------------
    def export_to(self, fmt: str, target: str | os.PathLike, *,
                  include_identifiers: bool = False) -> Path:
        """Write an export (atomically; see :mod:`cxrviewer.core.annotations.export`)."""
        if self.store is None:
            raise EditRefused("No annotation project open")
        return export_store(self.store, target, fmt, include_identifiers=include_identifiers)

    def import_from(self, fmt: str, source: str | os.PathLike, **kwargs: Any) -> Edit | None:
        """Import boxes as one undo step; studies not opened yet are matched when opened.

        Raises KeyError for an unknown format. Call :meth:`sync_record` next.
        """
        if not self.writable:
            raise EditRefused("Open an annotation project for editing first", level="error")
        edit = IMPORTERS[fmt](self.store, source, **kwargs)
        if is_committed(edit):
            assert self.undo_stack is not None
            self.undo_stack.push(edit)
        return edit
