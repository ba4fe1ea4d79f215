"""Annotation store: schema, pragmas, migrations, identity, validation, provenance, concurrency."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cxrviewer.core.annotations import (
    SCHEMA_VERSION, AnnotationStore, EditConflictError, InvalidBoxError, StudyIdentity,
    UndoStack, iter_training_records,
)
from cxrviewer.core.annotations.migrations import MIGRATIONS, migrate
from cxrviewer.core.errors import AnnotationStoreError
from cxrviewer.core.geometry import Box

H1 = "1" * 64
H2 = "2" * 64


@pytest.fixture()
def store(tmp_path: Path):
    s = AnnotationStore(tmp_path / "project.cxrann", annotator="alice")
    yield s
    s.close()


def _study(store: AnnotationStore, name: str = "a.png", sha: str = H1, w: int = 1000,
           h: int = 800, path: str | None = None) -> int:
    return store.ensure_study(StudyIdentity(name, sha256=sha), width=w, height=h,
                              path=path or f"/data/{name}").id


def test_pragmas_and_schema(store: AnnotationStore) -> None:
    c = store._conn
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"studies", "labels", "boxes", "proposals", "edits", "edit_ops"} <= tables
    cols = {r[1] for r in c.execute("PRAGMA table_info(studies)")}
    assert not {c for c in cols if "patient" in c or "name" == c}  # no patient fields stored
    assert store.integrity_check() == "ok"


def test_migrates_v1_store_forward(tmp_path: Path) -> None:
    p = tmp_path / "old.cxrann"
    conn = sqlite3.connect(p, isolation_level=None)
    migrate(conn, target=1)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.execute("INSERT INTO studies (file_name, content_sha256, path, width, height, created, "
                 "last_seen) VALUES ('old.png', ?, '/d/old.png', 100, 100, 't', 't')", (H1,))
    conn.execute("INSERT INTO boxes (study_id, label, x, y, w, h, annotator, created, modified, "
                 "modified_by, source) VALUES (1, 'Mass', 1, 2, 3, 4, 'bob', 't', 't', 'bob', "
                 "'manual')")
    conn.close()
    with AnnotationStore(p, annotator="alice") as s:
        assert s.schema_version == SCHEMA_VERSION
        (box,) = s.boxes(1)
        assert (box.label, box.x, box.y, box.w, box.h, box.annotator) == ("Mass", 1, 2, 3, 4, "bob")
        assert box.proposal_id is None
        e = s.add_proposals(1, [Box("Nodule", 10, 10, 5, 5, 0.7)], "m")  # v2 table works
        s.accept_proposal(e.ops[0].key)
        assert s.boxes(1)[-1].proposal_id == e.ops[0].key
        assert s.integrity_check() == "ok"
    assert (tmp_path / "old.cxrann.v1.bak").exists()  # backup before upgrading


def test_newer_schema_refused(tmp_path: Path) -> None:
    p = tmp_path / "new.cxrann"
    AnnotationStore(p, annotator="a").close()
    conn = sqlite3.connect(p)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = p.read_bytes()
    with pytest.raises(AnnotationStoreError, match="newer cxrviewer"):
        AnnotationStore(p, annotator="a")
    assert p.read_bytes() == before


def test_foreign_files_refused(tmp_path: Path) -> None:
    txt = tmp_path / "notes.cxrann"
    txt.write_text("hello")
    with pytest.raises(AnnotationStoreError, match="not an annotation store"):
        AnnotationStore(txt)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AnnotationStoreError, match="not a cxrviewer annotation store"):
        AnnotationStore(other)
    with pytest.raises(AnnotationStoreError, match="no annotation store"):
        AnnotationStore(tmp_path / "missing.cxrann", read_only=True)


def test_identity_lookup_and_moved_folder(store: AnnotationStore) -> None:
    sid = _study(store, "a.png", H1, path="/old/a.png")
    store.add_box(sid, "Mass", 10, 10, 50, 50)
    moved = store.ensure_study(StudyIdentity("a.png", sha256=H1), width=1000, height=800,
                               path="/new/place/a.png")
    assert moved.id == sid and moved.path == "/new/place/a.png"
    assert len(store.boxes(sid)) == 1
    # same name, other pixels: another study
    assert _study(store, "a.png", H2, path="/new/place/a.png") != sid
    # DICOM identity by SOP UID
    d = store.ensure_study(StudyIdentity("x.dcm", sop_uid="1.2.3"), width=10, height=10, path="/p")
    again = store.ensure_study(StudyIdentity("renamed.dcm", sop_uid="1.2.3"), width=10, height=10,
                               path="/q/renamed.dcm")
    assert again.id == d.id and again.path == "/q/renamed.dcm"
    assert store.find_study(path="/q/renamed.dcm").id == d.id


def test_unresolved_import_gets_identity_when_opened(store: AnnotationStore) -> None:
    rec = store.ensure_study(StudyIdentity("00000001_000.png"), width=1024, height=1024)
    store.add_box(rec.id, "Effusion", 1, 2, 3, 4)
    opened = store.ensure_study(StudyIdentity("00000001_000.png", sha256=H1), width=1024,
                                height=1024, path="/nih/images/00000001_000.png")
    assert opened.id == rec.id and opened.identity.sha256 == H1
    assert store.find_study(StudyIdentity("x", sha256=H1)).id == rec.id


def test_box_validation_and_clamping(store: AnnotationStore) -> None:
    sid = _study(store, w=100, h=80)
    e = store.add_box(sid, "Infiltrate", -10, 70, 30, 30)  # alias + clamped
    b = store.box(e.box_ids[0])
    assert (b.label, b.x, b.y, b.w, b.h) == ("Infiltration", 0.0, 70.0, 20.0, 10.0)
    e = store.add_box(sid, "Mass", 50, 50, -20, -10)  # dragged up-left
    b = store.box(e.box_ids[0])
    assert (b.x, b.y, b.w, b.h) == (30.0, 40.0, 20.0, 10.0)
    for args in [(10, 10, 0, 5), (200, 10, 5, 5), (10, 10, float("nan"), 3)]:
        with pytest.raises(InvalidBoxError):
            store.add_box(sid, "Mass", *args)
    with pytest.raises(ValueError, match="zero area"):
        store.update_box(e.box_ids[0], w=0)
    with pytest.raises(InvalidBoxError, match="unknown class"):
        store.add_box(sid, "Fracture", 1, 1, 5, 5)
    assert len(store.boxes(sid)) == 2
    assert store.update_box(e.box_ids[0], x=30.0).empty  # no change -> no edit


def test_provenance_history_labels_status(store: AnnotationStore) -> None:
    sid = _study(store)
    e = store.add_box(sid, "Nodule", 10, 10, 20, 20)
    bid = e.box_ids[0]
    store.update_box(bid, x=15)
    bob = AnnotationStore(store.path, annotator="bob")
    bob.update_box(bid, label="Mass")
    bob.close()
    b = store.box(bid)
    assert b.source == "manual" and b.annotator == "alice" and b.modified_by == "bob"
    assert b.created.endswith("+00:00") and b.modified >= b.created
    hist = store.history(box_id=bid)
    assert [h.action for h in hist] == ["create", "update", "update"]
    assert [h.who for h in hist] == ["alice", "alice", "bob"]
    assert hist[1].before["x"] == 10 and hist[1].after["x"] == 15
    assert hist[2].after["label"] == "Mass"
    store.set_label(sid, "Nodule", "present")
    store.set_label(sid, "Edema", "uncertain")
    store.set_label(sid, "Edema", None)
    assert store.labels(sid) == {"Nodule": "present"}
    with pytest.raises(ValueError):
        store.set_label(sid, "Nodule", "maybe")
    store.set_status(sid, "done")
    assert store.study(sid).status == "done" and store.study(sid).status_by == "alice"
    with pytest.raises(ValueError):
        store.set_status(sid, "finished")
    store.delete_box(bid)
    assert store.history(box_id=bid)[-1].action == "delete"


def test_proposals_apart_from_boxes(store: AnnotationStore) -> None:
    sid = _study(store)
    e = store.add_proposals(sid, [Box("Mass", 10, 10, 30, 30, 0.9), Box("Nodule", 5, 5, 0, 9, 0.5),
                                  Box("Effusion", 100, 100, 40, 40, 0.4)], "densenet-cam")
    assert len(e.ops) == 2  # the zero-area proposal was skipped
    assert store.boxes(sid) == []
    p1, p2 = (op.key for op in e.ops)
    store.accept_proposal(p1)
    store.reject_proposal(p2)
    (b,) = store.boxes(sid)
    assert (b.source, b.model_name, b.score, b.proposal_id) == ("model", "densenet-cam", 0.9, p1)
    assert [p.status for p in store.proposals(sid)] == ["accepted", "rejected"]
    with pytest.raises(AnnotationStoreError, match="already accepted"):
        store.accept_proposal(p1)


def test_two_instances_see_each_other(tmp_path: Path) -> None:
    p = tmp_path / "shared.cxrann"
    a = AnnotationStore(p, annotator="alice")
    b = AnnotationStore(p, annotator="bob", busy_timeout=2.0)
    try:
        sid = _study(a)
        assert b.changed_elsewhere()
        eb = b.add_box(sid, "Mass", 1, 1, 10, 10)
        ea = a.add_box(sid, "Nodule", 2, 2, 10, 10)
        assert {x.label for x in a.boxes(sid)} == {x.label for x in b.boxes(sid)} == {"Mass", "Nodule"}
        assert a.changed_elsewhere() and not a.changed_elsewhere()
        # bob moves alice's box; alice's undo of her add must refuse instead of clobbering
        b.update_box(ea.box_ids[0], x=50)
        stack = UndoStack(a)
        stack.push(ea)
        with pytest.raises(EditConflictError, match="changed elsewhere"):
            stack.undo()
        assert stack.can_undo and len(a.boxes(sid)) == 2
        # a writer holding the lock makes the other wait, then fail cleanly (no corruption)
        b._conn.execute("BEGIN IMMEDIATE")
        a2 = AnnotationStore(p, annotator="carol", busy_timeout=0.2)
        with pytest.raises(AnnotationStoreError, match="another program is writing"):
            a2.add_box(sid, "Mass", 1, 1, 3, 3)
        b._conn.execute("ROLLBACK")
        a2.add_box(sid, "Mass", 1, 1, 3, 3)
        a2.close()
        assert len(b.boxes(sid)) == 3 and eb.id is not None
        ro = AnnotationStore(p, read_only=True)
        assert ro.read_only and "read-only" in (ro.notice or "")
        assert len(ro.boxes(sid)) == 3
        with pytest.raises(AnnotationStoreError, match="read-only"):
            ro.add_box(sid, "Mass", 1, 1, 3, 3)
        ro.close()
        assert a.integrity_check() == "ok"
    finally:
        a.close()
        b.close()


def test_iter_training_records(store: AnnotationStore) -> None:
    s1 = _study(store, "a.png", H1)
    s2 = _study(store, "b.png", H2)
    store.add_box(s1, "Mass", 1, 2, 30, 40)
    store.set_label(s1, "Mass", "present")
    store.set_label(s1, "Edema", "absent")
    store.set_label(s2, "Hernia", "uncertain")
    store.set_status(s1, "verified")
    recs = {r.identity.key: r for r in iter_training_records(store)}
    r1 = recs[f"sha256:{H1}"]
    assert r1.path == "/data/a.png" and r1.labels == {"Mass": 1, "Edema": 0}
    assert r1.boxes == [Box("Mass", 1.0, 2.0, 30.0, 40.0)]
    assert recs[f"sha256:{H2}"].labels == {"Hernia": -1}
    only = list(iter_training_records(store, status=("done", "verified")))
    assert [r.identity.file_name for r in only] == ["a.png"]
    ident, path, labels, boxes = only[0]  # plain tuple unpacking works
    assert isinstance(boxes[0], Box)


def test_real_files_resolve_and_survive_moves(tmp_path: Path, nih_dir: Path, rg1_uncr: Path,
                                              store: AnnotationStore) -> None:
    import gzip
    import shutil

    from cxrviewer.core.annotations.export import import_nih_csv
    from cxrviewer.core.io import load_study

    import_nih_csv(store, nih_dir / "BBox_List_2017.csv.gz")  # names are .png, unresolved
    listed = {ln.split(",")[0][:-4] for ln in
              gzip.decompress((nih_dir / "BBox_List_2017.csv.gz").read_bytes()).decode()
              .splitlines()[1:]}
    jpg = next(p for p in sorted((nih_dir / "images").glob("*.jpg")) if p.stem in listed)
    a = tmp_path / "a" / jpg.name
    a.parent.mkdir()
    shutil.copy(jpg, a)
    rec = store.register_study(load_study(a))  # the .jpg copy resolves the imported .png row
    assert rec.identity.file_name == jpg.name and rec.identity.sha256 and rec.path == str(a)
    assert len(store.boxes(rec.id)) >= 1
    b = tmp_path / "b" / "moved" / jpg.name
    b.parent.mkdir(parents=True)
    shutil.move(a, b)
    moved = store.register_study(load_study(b))
    assert moved.id == rec.id and moved.path == str(b)

    d1 = tmp_path / "d1" / "RG1.dcm"
    d1.parent.mkdir()
    shutil.copy(rg1_uncr, d1)
    dicom = load_study(d1)
    first = store.register_study(dicom)
    assert first.identity.sop_uid == dicom.meta.sop_uid
    assert (first.width, first.height) == (dicom.shape[1], dicom.shape[0])
    store.add_box(first.id, "Cardiomegaly", 100, 100, 500, 400)
    d2 = tmp_path / "d2" / "renamed.dcm"
    d2.parent.mkdir()
    shutil.move(d1, d2)
    again = store.register_study(load_study(d2))
    assert again.id == first.id and again.path == str(d2) and len(store.boxes(again.id)) == 1
    dump = "\n".join(store._conn.iterdump())
    assert dicom.meta.patient_id and dicom.meta.patient_id not in dump  # no patient data kept


def test_foreign_sqlite_file_is_not_modified(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    with pytest.raises(AnnotationStoreError):
        AnnotationStore(other)
    assert other.read_bytes() == before  # journal mode not switched, nothing created
    assert not (tmp_path / "app.db-wal").exists()
