"""Annotation store against concurrent editors and hostile files (issue 15, items 8-10).

Two real processes editing one box (optimistic concurrency), read-only media, damaged
files, a folder in place of the store, folder exports killed midway, hostile file names.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from cxrviewer.core.annotations import (
    SCHEMA_VERSION, AnnotationSession, AnnotationStore, EditConflictError, StudyIdentity, UndoStack, created_box_ids,
)
from cxrviewer.core.annotations import export as ex
from cxrviewer.core.annotations import store as store_mod
from cxrviewer.core.annotations.migrations import migrate
from cxrviewer.core.errors import AnnotationConflictError, AnnotationStoreError, ExportError
from cxrviewer.core.geometry import Box
from cxrviewer.core.study import Study, StudyMeta


def _study(store: AnnotationStore, name: str = "a.png", w: int = 1000, h: int = 800) -> int:
    sha = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return store.ensure_study(StudyIdentity(name, sha256=sha), width=w, height=h,
                              path=f"/data/{name}").id


def _one_line_typed(exc: BaseException) -> None:
    assert isinstance(exc, AnnotationStoreError), type(exc)
    assert "\n" not in str(exc) and len(str(exc)) < 400


# ---- optimistic concurrency (item 8) -------------------------------------------------
_EDITOR = textwrap.dedent("""
    import sys
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.errors import AnnotationConflictError
    path, box_id, x, who = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    with AnnotationStore(path, annotator=who, busy_timeout=20) as s:
        box = s.box(box_id)                       # what this editor shows
        print("read", box.version, flush=True)
        sys.stdin.readline()                      # wait until told to commit
        try:
            s.update_box(box_id, x=x)
            print("ok", s.box(box_id).version, flush=True)
        except AnnotationConflictError as exc:
            print("conflict", exc, flush=True)
            s.boxes(s.box(box_id).study_id)       # reload the study, then retry
            s.update_box(box_id, x=x)
            print("retried", s.box(box_id).version, flush=True)
""")


def _editor(path: Path, box_id: int, x: float, who: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", _EDITOR, str(path), str(box_id), str(x), who],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_two_processes_same_box_second_commit_conflicts(tmp_path: Path) -> None:
    p = tmp_path / "shared.cxrann"
    with AnnotationStore(p, annotator="setup") as s:
        sid = _study(s)
        box_id = s.add_box(sid, "Mass", 10, 10, 50, 50).box_ids[0]
        v0 = s.box(box_id).version
    a, b = _editor(p, box_id, 100, "alice"), _editor(p, box_id, 200, "bob")
    try:
        assert a.stdout.readline().split() == ["read", str(v0)]  # both loaded version v0
        assert b.stdout.readline().split() == ["read", str(v0)]
        out_a, err_a = a.communicate("go\n", timeout=60)           # A commits first
        assert a.returncode == 0, err_a
        assert out_a.split() == ["ok", str(v0 + 1)]
        out_b, err_b = b.communicate("go\n", timeout=60)           # B's stale commit
        assert b.returncode == 0, err_b
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    conflict, retried = out_b.splitlines()
    assert conflict.startswith(f"conflict box {box_id} was changed by another editor (alice")
    assert "reload the study" in conflict
    assert retried.split() == ["retried", str(v0 + 2)]
    with AnnotationStore(p, read_only=True) as s:  # nothing acknowledged was lost
        assert s.box(box_id).x == 200 and s.box(box_id).version == v0 + 2
        moves = [h.after["x"] for h in s.history(box_id=box_id) if h.action == "update"]
        assert moves == [100, 200]
        assert s.integrity_check() == "ok"


_INCREMENTER = textwrap.dedent("""
    import sys, time
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.errors import AnnotationConflictError
    path, box_id, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    done = conflicts = 0
    with AnnotationStore(path, annotator="p", busy_timeout=30, synchronous="NORMAL") as s:
        print("ready", flush=True)
        sys.stdin.readline()                      # all start together
        while done < n:
            x = s.box(box_id).x                   # read ...
            time.sleep(0.005)                     # (the user thinks)
            try:
                s.update_box(box_id, x=x + 1)     # ... modify, write
                done += 1
            except AnnotationConflictError:
                conflicts += 1
    print(done, conflicts, flush=True)
""")


def test_racing_processes_lose_no_acknowledged_increment(tmp_path: Path) -> None:
    p = tmp_path / "race.cxrann"
    with AnnotationStore(p, annotator="setup") as s:
        box_id = s.add_box(_study(s), "Mass", 0, 10, 50, 50).box_ids[0]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENTER, str(p), str(box_id), "15"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    acknowledged = conflicts = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        acknowledged += int(out.split()[0])
        conflicts += int(out.split()[1])
    assert conflicts > 0  # the editors did race
    with AnnotationStore(p, read_only=True) as s:
        assert s.box(box_id).x == acknowledged == 45  # every acknowledged read-modify-write kept
        assert s.box(box_id).version == 46


def test_stale_edit_rolls_back_whole_batch(tmp_path: Path) -> None:
    p = tmp_path / "s.cxrann"
    with AnnotationStore(p, annotator="alice") as a, AnnotationStore(p, annotator="bob") as b:
        sid = _study(a)
        bid = a.add_box(sid, "Mass", 10, 10, 50, 50).box_ids[0]
        b.boxes(sid)
        a.update_box(bid, x=100)
        n_edits = len(b.edit_ids())
        with pytest.raises(AnnotationConflictError, match=f"box {bid} was changed by another "
                                                          "editor") as info:
            with b.batch("paste and move"):
                b.add_box(sid, "Nodule", 1, 1, 5, 5)
                b.update_box(bid, x=200)
        _one_line_typed(info.value)
        assert [x.label for x in a.boxes(sid)] == ["Mass"] and a.box(bid).x == 100
        assert len(b.edit_ids()) == n_edits
        # an explicit version is checked too
        with pytest.raises(AnnotationConflictError):
            b.update_box(bid, x=300, version=1)
        b.update_box(bid, x=300, version=a.box(bid).version)  # the version shown: accepted
        # delete elsewhere, then a stale move: the row is gone
        a.boxes(sid)
        b.delete_box(bid)
        with pytest.raises(AnnotationConflictError, match="deleted by another editor"):
            a.update_box(bid, x=5)
        assert a.integrity_check() == "ok"


def test_labels_and_status_have_versions(tmp_path: Path) -> None:
    p = tmp_path / "s.cxrann"
    with AnnotationStore(p, annotator="alice") as a, AnnotationStore(p, annotator="bob") as b:
        sid = _study(a)
        a.set_label(sid, "Mass", "present")
        b.labels(sid)
        a.study(sid)
        b.study(sid)
        a.set_label(sid, "Mass", "absent")
        with pytest.raises(AnnotationConflictError, match="label Mass of study"):
            b.set_label(sid, "Mass", "uncertain")
        b.set_status(sid, "done")
        with pytest.raises(AnnotationConflictError, match="review status"):
            a.set_status(sid, "verified")
        a.study(sid)  # reloaded: now allowed
        a.set_status(sid, "verified")
        assert b.labels(sid) == {"Mass": "absent"} and b.study(sid).status == "verified"


def test_undo_redo_keep_working_and_bump_versions(tmp_path: Path) -> None:
    with AnnotationStore(tmp_path / "s.cxrann", annotator="alice") as s:
        sid = _study(s)
        stack = UndoStack(s)
        bid = stack.push(s.add_box(sid, "Mass", 10, 10, 50, 50)).box_ids[0]
        stack.push(s.update_box(bid, x=20))
        stack.push(s.delete_box(bid))
        versions = []
        for _ in range(3):
            stack.undo()
            if s.boxes(sid):
                versions.append(s.box(bid).version)
        assert s.boxes(sid) == []
        for _ in range(3):
            stack.redo()
        assert s.boxes(sid) == []
        stack.undo()  # the box comes back with a version above every earlier one
        assert s.box(bid).version > max(versions) and s.box(bid).x == 20
        s.update_box(bid, x=30)  # this instance's own writes keep its versions current


def test_undo_conflict_is_a_conflict_error(tmp_path: Path) -> None:
    p = tmp_path / "s.cxrann"
    with AnnotationStore(p, annotator="alice") as a, AnnotationStore(p, annotator="bob") as b:
        sid = _study(a)
        stack = UndoStack(a)
        bid = stack.push(a.add_box(sid, "Mass", 10, 10, 50, 50)).box_ids[0]
        b.update_box(bid, x=70)
        with pytest.raises(AnnotationConflictError) as info:
            stack.undo()
        assert isinstance(info.value, EditConflictError) and stack.can_undo


def test_v2_store_migrates_to_versions_and_new_store_logs_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "old.cxrann"
    conn = sqlite3.connect(p, isolation_level=None)
    migrate(conn, target=2)
    conn.execute("INSERT INTO studies (file_name, content_sha256, path, width, height, created, "
                 "last_seen) VALUES ('old.png', 'ab', '/d/old.png', 100, 100, 't', 't')")
    conn.execute("INSERT INTO boxes (study_id, label, x, y, w, h, annotator, created, modified, "
                 "modified_by, source) VALUES (1, 'Mass', 1, 2, 3, 4, 'bob', 't', 't', 'bob', "
                 "'manual')")
    conn.close()
    with caplog.at_level(logging.INFO, logger="cxrviewer.core.annotations.store"):
        with AnnotationStore(p, annotator="alice") as s:
            assert s.schema_version == SCHEMA_VERSION >= 3
            assert s.box(1).version == 1
            s.update_box(1, x=5)
            assert s.box(1).version == 2
        assert f"schema migrated to v{SCHEMA_VERSION}" in caplog.text
        assert (tmp_path / "old.cxrann.v2.bak").exists()
        caplog.clear()
        AnnotationStore(tmp_path / "new.cxrann").close()
        assert "migrat" not in caplog.text


# ---- read-only opening (item 9) -------------------------------------------------------
def _filled_store(path: Path, n: int = 3) -> int:
    with AnnotationStore(path, annotator="alice") as s:
        sid = _study(s)
        for i in range(n):
            s.add_box(sid, "Mass", 10 + i, 10, 50, 50)
        return sid


def test_read_only_media_opens_immutable_without_side_files(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "media" / "p.cxrann"
    sid = _filled_store(p)
    assert not p.with_name("p.cxrann-wal").exists()
    before = p.read_bytes()
    # running as root makes chmod ineffective: simulate a read-only folder
    monkeypatch.setattr(store_mod, "_folder_writable", lambda folder: False)
    with AnnotationStore(p, read_only=True) as ro:
        assert "read-only folder" in (ro.notice or "")
        assert len(ro.boxes(sid)) == 3 and ro.integrity_check() == "ok"
        with pytest.raises(AnnotationStoreError, match="read-only") as info:
            ro.add_box(sid, "Mass", 1, 1, 3, 3)
        _one_line_typed(info.value)
    assert sorted(x.name for x in p.parent.iterdir()) == ["p.cxrann"]  # no -wal / -shm made
    assert p.read_bytes() == before
    with pytest.raises(AnnotationStoreError, match="open it read-only") as info:
        AnnotationStore(p)
    _one_line_typed(info.value)


def test_old_schema_read_only_on_read_only_media(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "cd" / "old.cxrann"
    p.parent.mkdir()
    conn = sqlite3.connect(p, isolation_level=None)
    migrate(conn, target=2)
    conn.execute("INSERT INTO studies (file_name, content_sha256, path, width, height, created, "
                 "last_seen) VALUES ('old.png', 'ab', '/d/old.png', 100, 100, 't', 't')")
    conn.execute("INSERT INTO boxes (study_id, label, x, y, w, h, annotator, created, modified, "
                 "modified_by, source) VALUES (1, 'Mass', 1, 2, 3, 4, 'bob', 't', 't', 'bob', "
                 "'manual')")
    conn.close()
    before = p.read_bytes()
    monkeypatch.setattr(store_mod, "_folder_writable", lambda folder: False)
    with AnnotationStore(p, read_only=True) as ro:
        assert "upgraded in memory only" in (ro.notice or "")
        assert ro.box(1).version == 1 and ro.box(1).x == 1
        with pytest.raises(AnnotationStoreError, match="read-only"):
            ro.update_box(1, x=5)
    assert p.read_bytes() == before and sorted(x.name for x in p.parent.iterdir()) == ["old.cxrann"]


def test_read_only_folder_chmod(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    p = folder / "p.cxrann"
    sid = _filled_store(p)
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not make the folder read-only")
        with AnnotationStore(p, read_only=True) as ro:
            assert len(ro.boxes(sid)) == 3
        assert sorted(x.name for x in folder.iterdir()) == ["p.cxrann"]
        with pytest.raises(AnnotationStoreError):
            AnnotationStore(p)  # read-write in a read-only folder: typed, one line
    finally:
        folder.chmod(0o755)


def test_read_only_next_to_a_writer(tmp_path: Path) -> None:
    p = tmp_path / "p.cxrann"
    with AnnotationStore(p, annotator="alice") as w:  # a live writer: its -wal exists
        sid = _study(w)
        w.add_box(sid, "Mass", 1, 1, 5, 5)
        with AnnotationStore(p, read_only=True) as ro:
            assert ro.notice == "opened read-only: edits are disabled"
            w.add_box(sid, "Mass", 2, 2, 5, 5)
            assert len(ro.boxes(sid)) == 2  # sees the writer's commits
            with pytest.raises(AnnotationStoreError, match="read-only"):
                ro.set_status(sid, "done")


# ---- damaged files, a folder in the way (item 9) -------------------------------------------
@pytest.mark.parametrize("read_only", [False, True])
def test_folder_named_like_a_store(tmp_path: Path, read_only: bool) -> None:
    d = tmp_path / "x.cxrann"
    d.mkdir()
    with pytest.raises(AnnotationStoreError, match="folder") as info:
        AnnotationStore(d, read_only=read_only)
    _one_line_typed(info.value)


def _read_everything(path: Path, read_only: bool) -> None:
    with AnnotationStore(path, read_only=read_only) as s:
        for rec in s.studies():
            s.boxes(rec.id)
            s.labels(rec.id)
            s.proposals(rec.id)
        s.history()
        s.integrity_check()


@pytest.mark.parametrize("read_only", [False, True])
def test_zeroed_pages_and_garbage_give_typed_errors(tmp_path: Path, read_only: bool) -> None:
    good = tmp_path / "good.cxrann"
    _filled_store(good, n=200)
    data = good.read_bytes()
    page = int.from_bytes(data[16:18], "big") or 65536
    cases = {"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2],
             "header only": data[:100]}
    for i in range(1, len(data) // page):
        cases[f"zeroed page {i + 1}"] = data[: i * page] + bytes(page) + data[(i + 1) * page:]
    rng = random.Random(15)
    for k in range(20):  # random bytes overwritten past the header
        buf = bytearray(data)
        for _ in range(8):
            j = rng.randrange(100, len(buf))
            buf[j] = rng.randrange(256)
        cases[f"flipped {k}"] = bytes(buf)
    refused = 0
    for name, blob in cases.items():
        p = tmp_path / f"case-{len(blob)}-{abs(hash(name))}.cxrann"
        p.write_bytes(blob)
        try:
            _read_everything(p, read_only)
        except AnnotationStoreError as exc:
            _one_line_typed(exc)
            refused += 1
    assert refused >= len(cases) // 3  # most damage is found; none leaks a raw error


# ---- folder exports (item 10) -------------------------------------------------------------
ODD_NAMES = ["x" * 300 + ".png", "CON.png", "a\x07b.png", "a\\b.png", "\u202egnp.exe.png",
             "a:b?.png", "A.png", "a.png", "a.jpg", "..png", "é" * 200 + ".dcm"]


def _odd_store(path: Path) -> AnnotationStore:
    s = AnnotationStore(path, annotator="alice")
    for name in ODD_NAMES:
        sid = _study(s, name)
        s.add_box(sid, "Mass", 1, 2, 30, 40)
    return s


def test_long_and_odd_names_export_safely(tmp_path: Path) -> None:
    s = _odd_store(tmp_path / "s.cxrann")
    voc = ex.export_voc(s, tmp_path / "voc") / ex.VOC_ROOT / "Annotations"
    xmls = sorted(voc.iterdir())
    assert len(xmls) == len(ODD_NAMES)
    assert len({x.name.lower() for x in xmls}) == len(ODD_NAMES)  # unique, even ignoring case
    for x in xmls:
        assert len(x.name.encode()) <= 255 and x.parent == voc
        assert not any(c in x.name for c in '\\:?\x07\u202e') and x.stem.upper() != "CON"
        ET.parse(x)  # control characters did not make invalid XML
    yolo = ex.export_yolo(s, tmp_path / "yolo")
    assert len(list((yolo / "labels").iterdir())) == len(ODD_NAMES)
    again = ex.export_voc(s, tmp_path / "voc2") / ex.VOC_ROOT / "Annotations"
    assert sorted(x.name for x in again.iterdir()) == [x.name for x in xmls]  # deterministic
    z = ex.export_yolo(s, tmp_path / "yolo.zip")
    assert z.exists()
    assert ex.safe_stem("x" * 300 + ".png").startswith("x" * 50)
    s.close()


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_export_killed_midway_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fmt: str) -> None:
    s = _odd_store(tmp_path / "s.cxrann")
    target = tmp_path / "out"
    real = ex._write_file
    calls = []

    def dying(path: Path, data: bytes) -> None:
        assert not target.exists()  # nothing at the target until the folder is complete
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ex, "_write_file", dying)
    with pytest.raises(ExportError, match="left unchanged") as info:
        ex.export_store(s, target, fmt)
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "s.cxrann", tmp_path / "s.cxrann-shm",
                                          tmp_path / "s.cxrann-wal"]  # no folder, no temp left
    # an existing export is replaced only once the new one is complete
    monkeypatch.undo()
    first = ex.export_store(s, target, fmt)
    snapshot = {q: q.read_bytes() for q in first.rglob("*") if q.is_file()}
    calls.clear()
    monkeypatch.setattr(ex, "_write_file", lambda p, d: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(ExportError):
        ex.export_store(s, target, fmt)
    assert {q: q.read_bytes() for q in target.rglob("*") if q.is_file()} == snapshot
    monkeypatch.undo()
    s.add_box(_study(s, "new.png"), "Nodule", 1, 1, 5, 5)
    ex.export_store(s, target, fmt)
    assert len([q for q in target.rglob("*") if q.is_file()]) == len(snapshot) + 1
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []
    s.close()


_SLOW_EXPORT = textwrap.dedent("""
    import sys, time
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations import export as ex
    real, n = ex._write_file, [0]
    def slow(path, data):
        real(path, data)
        n[0] += 1
        if n[0] == 3:
            print("writing", flush=True)
            time.sleep(60)
    ex._write_file = slow
    with AnnotationStore(sys.argv[1], read_only=True) as s:
        ex.export_store(s, sys.argv[2], sys.argv[3])
""")


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_export_killed_by_sigkill_leaves_no_target(tmp_path: Path, fmt: str) -> None:
    _odd_store(tmp_path / "s.cxrann").close()
    target = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(tmp_path / "s.cxrann"),
                             str(target), fmt], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not target.exists()  # only a hidden temporary folder may be left
    assert all(q.name.startswith(".out.") for q in tmp_path.iterdir()
               if not q.name.startswith("s.cxrann"))


def test_export_refuses_folder_with_other_files(tmp_path: Path) -> None:
    s = _odd_store(tmp_path / "s.cxrann")
    target = tmp_path / "dataset"
    (target / "images").mkdir(parents=True)
    (target / "images" / "a.png").write_bytes(b"png")
    with pytest.raises(ExportError, match="does not write"):
        ex.export_yolo(s, target)
    assert (target / "images" / "a.png").read_bytes() == b"png"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="in the way"):
        ex.export_voc(s, tmp_path / "file")
    s.close()


def test_proposals_unaffected(tmp_path: Path) -> None:
    with AnnotationStore(tmp_path / "s.cxrann", annotator="alice") as s:
        sid = _study(s)
        e = s.add_proposals(sid, [Box("Nodule", 10, 10, 5, 5, 0.7)], "m")
        s.accept_proposal(e.ops[0].key)
        assert s.boxes(sid)[0].version == 1


def _make_study(name: str = "s0") -> Study:
    stored = np.random.default_rng(0).integers(0, 4096, size=(400, 500), dtype=np.uint16)
    modality = stored.astype(np.float32)
    meta = StudyMeta(source_path=f"/fake/{name}.png", format="png", photometric="MONOCHROME2",
                     bits_stored=12)
    return Study(stored=stored, modality=modality, model_input=modality / 4095.0,
                 window=(2048.0, 4096.0), invert_display=False, meta=meta, study_id=name)


def test_sessions_conflict_then_reload(tmp_path: Path) -> None:
    p = tmp_path / "p.cxrann"
    alice, bob = AnnotationSession("alice"), AnnotationSession("bob")
    try:
        for s in (alice, bob):
            s.open(p)
            s.set_study(_make_study())
        bid = created_box_ids(alice.draw_box("Mass", 10, 10, 50, 50))[0]
        bob.snapshot()  # bob's screen shows the box
        alice.move_box(bid, 100, 10, 50, 50)
        with pytest.raises(AnnotationConflictError, match="reload the study"):
            bob.move_box(bid, 200, 10, 50, 50)
        assert alice.store.box(bid).x == 100 and not bob.undo_stack.can_undo
        bob.snapshot()  # the GUI redraws (reloads the study) after showing the message
        bob.move_box(bid, 200, 10, 50, 50)
        assert alice.store.box(bid).x == 200
        with pytest.raises(EditConflictError):  # alice's undo does not clobber bob's move
            alice.undo()
    finally:
        alice.close()
        bob.close()
