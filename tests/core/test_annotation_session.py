"""The annotation session without Qt: project lifecycle, the shown study, every edit the GUI issues,
undo/redo, the box clipboard, proposals, exports and imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxrviewer.core.annotations import (
    AnnotationSession, AnnotationStore, BoxClipboard, EditRefused, InvalidBoxError,
    created_box_ids, is_committed, proposals_from_results,
)
from cxrviewer.core.geometry import Box
from cxrviewer.core.study import Study, StudyMeta

H, W = 400, 500


def make_study(shape: tuple[int, int] = (H, W), seed: int = 0, name: str = "s0") -> Study:
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    modality = stored.astype(np.float32)
    meta = StudyMeta(source_path=f"/fake/{name}.png", format="png", photometric="MONOCHROME2",
                     bits_stored=12)
    return Study(stored=stored, modality=modality, model_input=modality / 4095.0,
                 window=(2048.0, 4096.0), invert_display=False, meta=meta, study_id=name)


@pytest.fixture
def session(tmp_path: Path):
    s = AnnotationSession("tester")
    s.open(tmp_path / "p.cxrann")
    s.set_study(make_study())
    yield s
    s.close()


def rows(s: AnnotationSession) -> list[tuple]:
    assert s.store is not None and s.record is not None
    return [(b.label, b.x, b.y, b.w, b.h, b.source) for b in s.store.boxes(s.record.id)]


def test_session_module_imports_no_qt_torch_or_training() -> None:
    code = ("import sys, cxrviewer.core.annotations.session; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('PySide6', 'pyqtgraph', 'torch', 'training')]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_open_close_lock_and_notice(tmp_path: Path) -> None:
    calls: list[str] = []

    def lock(path: Path):
        calls.append(f"lock {path.name}")
        return (lambda: calls.append("release")), None

    s = AnnotationSession("a", lock=lock)
    assert s.close() is False and not s.writable
    store = s.open(tmp_path / "x.cxrann")
    assert isinstance(store, AnnotationStore) and s.writable and s.notice is None
    assert s.undo_stack is not None and not s.undo_stack.can_undo
    assert s.close() is True and calls == ["lock x.cxrann", "release"]
    assert s.store is None and s.undo_stack is None and s.record is None
    # held elsewhere: no release, the notice says so; a read-only open takes no lock
    s2 = AnnotationSession("b", lock=lambda _p: (None, "Also open elsewhere."))
    s2.open(tmp_path / "x.cxrann")
    assert s2.notice == "Also open elsewhere."
    s2.open(tmp_path / "x.cxrann", read_only=True)
    assert not s2.writable and s2.notice.startswith("Opened read-only")
    s2.close()
    # a failed open releases the lock it took
    calls.clear()
    with pytest.raises(Exception):
        s.open(tmp_path / "missing.cxrann", create=False)
    assert calls == ["lock missing.cxrann", "release"] and s.store is None


def test_study_registration_and_previous_study(tmp_path: Path) -> None:
    s = AnnotationSession("a")
    assert s.set_study(make_study()) is None  # no project: nothing to register
    s.open(tmp_path / "p.cxrann")
    first = s.sync_record()
    assert first is not None and (first.width, first.height) == (W, H) and first.status == "unseen"
    second = s.set_study(make_study(seed=1, name="s1"))
    assert second.id != first.id and s.prev_study_id == first.id
    snap = s.snapshot()
    assert snap is not None and snap.record.id == second.id and snap.boxes == [] and snap.labels == {}
    s.set_study(None)
    assert s.record is None and s.prev_study_id == second.id and s.snapshot() is None
    s.close()


def test_draw_is_one_step_marks_present_and_in_progress(session: AnnotationSession) -> None:
    n = len(session.store.edit_ids())
    edit = session.draw_box("Mass", 10, 20, 30, 40)
    assert is_committed(edit) and len(session.store.edit_ids()) == n + 1
    assert rows(session) == [("Mass", 10, 20, 30, 40, "manual")]
    assert session.store.labels(session.record.id) == {"Mass": "present"}
    assert session.snapshot().record.status == "in_progress"
    assert len(created_box_ids(edit)) == 1 and len(session.undo_stack) == 1
    session.auto_present = False
    session.draw_box("Nodule", 50, 50, 10, 10)
    assert "Nodule" not in session.store.labels(session.record.id)
    session.undo()
    session.undo()
    assert rows(session) == [] and session.snapshot().record.status == "unseen"
    assert session.store.labels(session.record.id) == {}
    session.redo()
    assert rows(session) == [("Mass", 10, 20, 30, 40, "manual")]


def test_move_relabel_delete_and_refusals(session: AnnotationSession) -> None:
    bid = created_box_ids(session.draw_box("Mass", 10, 20, 30, 40))[0]
    session.move_box(bid, 400, 300, 200, 200)  # clamped to the image
    assert rows(session) == [("Mass", 400, 300, 100, 100, "manual")]
    session.relabel([bid], "Nodule")
    assert rows(session)[0][0] == "Nodule"
    with pytest.raises(EditRefused, match="Nothing selected") as refused:
        session.delete([], [])
    assert refused.value.level == "info"
    with pytest.raises(InvalidBoxError):
        session.draw_box("Mass", 10, 10, 0, 20)  # zero area: nothing written
    session.delete([bid])
    assert rows(session) == []
    assert session.undo_stack.undo_text == "delete 1 box"


def test_editing_needs_a_writable_project_and_a_study(tmp_path: Path) -> None:
    opened: list[bool] = []
    s = AnnotationSession("a")
    with pytest.raises(EditRefused) as no_project:
        s.draw_box("Mass", 1, 1, 5, 5)
    assert no_project.value.level == "error"

    def open_default() -> bool:
        s.open(tmp_path / "default.cxrann")
        opened.append(True)
        return True

    s = AnnotationSession("a", open_default=open_default)
    with pytest.raises(EditRefused, match="No study shown"):
        s.draw_box("Mass", 1, 1, 5, 5)
    assert opened == [True] and s.store is not None
    s.set_study(make_study())
    assert is_committed(s.draw_box("Mass", 1, 1, 5, 5))
    s.open(tmp_path / "default.cxrann", read_only=True)
    s.sync_record()
    assert s.record is not None  # found, not registered
    with pytest.raises(EditRefused, match="read-only") as ro:
        s.draw_box("Mass", 1, 1, 5, 5)
    assert ro.value.level == "error"
    assert s.undo() is None and s.add_proposals([Box("Mass", 1, 1, 5, 5)], "m") == 0
    s.close()


def test_clipboard_paste_duplicate_and_carry_scaled(session: AnnotationSession) -> None:
    session.draw_box("Mass", 10, 20, 30, 40)
    clip = BoxClipboard()
    with pytest.raises(EditRefused, match="Nothing to paste"):
        session.paste(clip)
    assert clip.copy([Box("Nodule", 100, 100, 50, 50)], (W, H)) == 1 and len(clip) == 1
    assert '"label": "Nodule"' in clip.to_json()
    session.paste(clip)
    session.duplicate([Box("Nodule", 100, 100, 50, 50)], (10.0, 10.0))
    with pytest.raises(EditRefused, match="Nothing selected to duplicate"):
        session.duplicate([], (10.0, 10.0))
    assert [r[:3] for r in rows(session)] == [("Mass", 10, 20), ("Nodule", 100, 100), ("Nodule", 110, 110)]
    # a box wholly outside this image is skipped, the others are added
    session.add_boxes([Box("Mass", 900, 900, 10, 10), Box("Mass", 1, 1, 5, 5)], "mixed")
    assert len(rows(session)) == 4
    here = rows(session)
    session.set_study(make_study((2 * H, 2 * W), seed=1, name="s1"))  # twice as large
    session.paste(clip)  # scaled from the image it was copied from
    assert rows(session) == [("Nodule", 200, 200, 100, 100, "manual")]
    n_undo = len(session.undo_stack)
    session.carry_previous()
    assert len(session.undo_stack) == n_undo + 1  # one undo step
    carried = rows(session)
    assert len(carried) == len(here)  # the pasted Nodule was already there
    assert ("Mass", 20, 40, 60, 80, "manual") in carried
    with pytest.raises(EditRefused, match="already here"):
        session.carry_previous()


def test_carry_refusals(tmp_path: Path) -> None:
    s = AnnotationSession("a")
    s.open(tmp_path / "p.cxrann")
    s.set_study(make_study())
    with pytest.raises(EditRefused, match="No previous study"):
        s.carry_previous()
    s.set_study(make_study(seed=1, name="s1"))
    with pytest.raises(EditRefused, match="no boxes"):
        s.carry_previous()
    s.close()


def test_proposals_accept_reject_and_adjust(session: AnnotationSession) -> None:
    groups = {"cia": [Box("Mass", 50, 50, 80, 60, 0.9), Box("Nodule", 300, 200, 40, 40, 0.4)]}
    assert session.add_proposals(groups, "tiny") == 2
    assert session.add_proposals(groups, "tiny") == 0  # once per model name and study
    assert not session.undo_stack.can_undo  # not an undo step
    edit = session.accept_proposals()  # none selected: the first pending one
    box = session.store.box(created_box_ids(edit)[0])
    assert (box.label, box.source, box.model_name, box.score) == ("Mass", "model", "tiny:cia", 0.9)
    session.reject_proposals()
    assert [p.status for p in session.store.proposals(session.record.id)] == ["accepted", "rejected"]
    with pytest.raises(EditRefused, match="No model proposal to accept"):
        session.accept_proposals()
    assert session.add_proposals([Box("Effusion", 300, 250, 60, 60, 0.7)], "other") == 1
    pid = session.snapshot().proposals[0].id
    edit = session.accept_adjusted(pid, 250, 210, 60, 60)
    moved = session.store.box(created_box_ids(edit)[0])
    assert (moved.x, moved.y, moved.source) == (250, 210, "model")
    session.undo()  # accept + move were one step
    assert [p.id for p in session.snapshot().proposals] == [pid]


def test_labels_status_and_toggle_done(session: AnnotationSession) -> None:
    session.set_label("Effusion", "uncertain")
    assert session.store.labels(session.record.id) == {"Effusion": "uncertain"}
    session.set_label("Effusion", None)
    assert session.store.labels(session.record.id) == {}
    session.toggle_done()
    assert session.snapshot().record.status == "done"
    session.toggle_done()
    assert session.snapshot().record.status == "in_progress"
    session.set_status("verified")
    session.toggle_done()
    assert session.snapshot().record.status == "in_progress"


def test_undo_on_another_study_is_reported(session: AnnotationSession) -> None:
    session.draw_box("Mass", 10, 20, 30, 40)
    session.set_study(make_study(seed=1, name="s1"))
    edit = session.undo()
    assert edit is not None and session.elsewhere(edit)
    assert session.undo() is None  # nothing more to undo
    redone = session.redo()
    assert redone is not None and session.elsewhere(redone)
    assert not session.elsewhere(session.draw_box("Mass", 1, 1, 5, 5))


def test_export_and_import_round_trip(session: AnnotationSession, tmp_path: Path) -> None:
    session.draw_box("Mass", 10, 20, 30, 40)
    session.draw_box("Nodule", 100, 120, 12, 14)
    before = rows(session)
    out = session.export_to("coco", tmp_path / "a.json")
    assert out.exists()
    session.open(tmp_path / "other.cxrann")
    edit = session.import_from("coco", out)
    assert edit is not None and len(edit.box_ids) == 2 and session.undo_stack.can_undo
    session.sync_record()
    assert [r[:5] for r in rows(session)] == [r[:5] for r in before]
    with pytest.raises(KeyError):
        session.import_from("nope", out)
    session.close()
    with pytest.raises(EditRefused):
        session.export_to("coco", tmp_path / "b.json")
    with pytest.raises(EditRefused, match="for editing"):
        session.import_from("coco", out)


def test_proposals_from_results_only_for_the_study() -> None:
    boxes = {"cia": [Box("Mass", 1, 2, 3, 4, 0.5)], "cam": []}
    res = SimpleNamespace(boxes=boxes, study_id="s0")
    assert proposals_from_results(res, "s0") == {"cia": [Box("Mass", 1, 2, 3, 4, 0.5)], "cam": []}
    assert proposals_from_results(res, "other") == {}
    assert proposals_from_results(SimpleNamespace(boxes={}, study_id="s0"), "s0") == {}
