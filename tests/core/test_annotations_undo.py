"""Undo/redo: every edit is inverse-able, undo is a new committed edit, batches are one step."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from cxrviewer.core.annotations import AnnotationStore, InvalidBoxError, StudyIdentity, UndoStack
from cxrviewer.core.geometry import Box


def _snapshot(store: AnnotationStore, sid: int) -> tuple:
    boxes = tuple((b.id, b.label, b.x, b.y, b.w, b.h, b.source) for b in store.boxes(sid))
    props = tuple((p.id, p.status) for p in store.proposals(sid))
    return boxes, tuple(sorted(store.labels(sid).items())), store.study(sid).status, props


@pytest.fixture()
def setup(tmp_path: Path):
    store = AnnotationStore(tmp_path / "u.cxrann", annotator="alice")
    sid = store.ensure_study(StudyIdentity("a.png", sha256="f" * 64), width=500, height=400).id
    yield store, sid, UndoStack(store)
    store.close()


def test_each_edit_kind_undoes_and_redoes(setup) -> None:
    store, sid, stack = setup
    states = [_snapshot(store, sid)]
    e = stack.push(store.add_box(sid, "Mass", 10, 20, 30, 40))
    states.append(_snapshot(store, sid))
    bid = e.box_ids[0]
    stack.push(store.update_box(bid, x=12.5, label="Nodule"))
    states.append(_snapshot(store, sid))
    stack.push(store.set_label(sid, "Nodule", "present"))
    states.append(_snapshot(store, sid))
    stack.push(store.set_status(sid, "in_progress"))
    states.append(_snapshot(store, sid))
    p = store.add_proposals(sid, [Box("Effusion", 100, 100, 50, 50, 0.8)], "m")
    stack.push(p)
    states.append(_snapshot(store, sid))
    stack.push(store.accept_proposal(p.ops[0].key))
    states.append(_snapshot(store, sid))
    stack.push(store.delete_box(bid))
    states.append(_snapshot(store, sid))
    assert len(stack) == 7 and stack.undo_text.startswith("delete box")
    n_edits = len(store.edit_ids())
    for i in range(7, 0, -1):
        applied = stack.undo()
        assert applied is not None and applied.kind == "undo" and applied.id is not None
        assert _snapshot(store, sid) == states[i - 1]
    assert stack.undo() is None and not stack.can_undo
    assert len(store.edit_ids()) == n_edits + 7  # undo is logged as new edits
    for i in range(1, 8):
        assert stack.redo().kind == "redo"
        assert _snapshot(store, sid) == states[i]
    assert not stack.can_redo
    # a box re-created by redo keeps its id and creator
    assert store.history(box_id=bid)[-1].action == "delete"


def test_batch_is_one_step_and_atomic(setup) -> None:
    store, sid, stack = setup
    calls = []
    stack.on_change = lambda s: calls.append(len(s))
    e = stack.push(store.add_boxes(sid, [Box("Mass", 1, 1, 5, 5), Box("Nodule", 9, 9, 5, 5),
                                         Box("Effusion", 20, 20, 8, 8)], "paste 3 boxes"))
    assert e.kind == "batch" and len(e.box_ids) == 3 and len(store.boxes(sid)) == 3
    stack.undo()
    assert store.boxes(sid) == []
    stack.redo()
    assert len(store.boxes(sid)) == 3 and calls == [1, 0, 1]
    n = len(store.edit_ids())
    with pytest.raises(InvalidBoxError):
        with store.batch("bad paste"):
            store.add_box(sid, "Mass", 1, 1, 5, 5)
            store.add_box(sid, "Mass", 1, 1, 0, 5)
    assert len(store.boxes(sid)) == 3 and len(store.edit_ids()) == n  # nothing written
    # a part that fails inside a batch leaves no trace, the rest commits as one edit
    with store.batch("carry") as b:
        store.add_box(sid, "Mass", 2, 2, 5, 5)
        with pytest.raises(InvalidBoxError):
            store.add_box(sid, "Mass", 900, 900, 5, 5)
        store.set_label(sid, "Mass", "present")
    assert len(b.edit.ops) == 2 and len(store.boxes(sid)) == 4
    with pytest.raises(ValueError):
        stack.push(b.edit.inverse())  # an uncommitted edit is refused


def test_random_sessions_undo_to_start(setup) -> None:
    store, sid, stack = setup
    rng = random.Random(7)
    start = _snapshot(store, sid)
    states = [start]
    for _ in range(60):
        boxes = store.boxes(sid)
        r = rng.random()
        if r < 0.4 or not boxes:
            e = store.add_box(sid, rng.choice(["Mass", "Nodule", "Atelectasis"]),
                              rng.uniform(-20, 480), rng.uniform(-20, 380), rng.uniform(5, 80),
                              rng.uniform(5, 80))
        elif r < 0.7:
            e = store.update_box(rng.choice(boxes).id, x=rng.uniform(0, 400), w=rng.uniform(3, 50))
        elif r < 0.85:
            e = store.delete_box(rng.choice(boxes).id)
        else:
            e = store.set_label(sid, "Mass", rng.choice(["present", "absent", "uncertain", None]))
        if not e.empty:
            stack.push(e)
            states.append(_snapshot(store, sid))
    for expected in reversed(states[:-1]):
        stack.undo()
        assert _snapshot(store, sid) == expected
    assert _snapshot(store, sid) == start
    # the logged edits replay (from JSON) to the same state as the tables
    assert store.integrity_check() == "ok"
    logged = store.edit(store.edit_ids()[-1])
    assert logged.kind == "undo" and logged.ops
