"""Annotation projects record a label set (issue 16, item 2): proposals, boxes, imports, exports
and the ``cxrviewer annotations`` CLI follow it; an old schema-3 store becomes ``nih14`` unchanged."""
from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cxrviewer.cli import annotations as cli
from cxrviewer.core.annotations import (
    SCHEMA_VERSION, AnnotationSession, AnnotationStore, InvalidBoxError, StudyIdentity,
    UnmappedClassesError, UnmappedProposalError, export_store, import_coco, import_nih_csv,
)
from cxrviewer.core.annotations.export import NIH_BBOX_HEADER
from cxrviewer.core.annotations.migrations import migrate
from cxrviewer.core.errors import AnnotationStoreError, ExportError, UnmappedLabelsError
from cxrviewer.core.geometry import Box
from cxrviewer.core.labelsets import TORCHXRAYVISION18, VINDR_CXR
from cxrviewer.core.study import Study, StudyMeta

#: the VinDr-CXR class names as their COCO files spell them, with a lower-case NIH name
VINDR_BOXES = [("Aortic enlargement", [100, 80, 60, 40]), ("Nodule/Mass", [300, 200, 30, 30]),
               ("Pleural effusion", [50, 300, 120, 60]), ("Cardiomegaly", [150, 250, 200, 100]),
               ("Lung Opacity", [320, 100, 80, 90])]


def _study(seed: int = 0) -> Study:
    stored = np.random.default_rng(seed).integers(0, 4096, size=(64, 80), dtype=np.uint16)
    meta = StudyMeta(source_path=f"/fake/s{seed}.png", format="png", photometric="MONOCHROME2",
                     bits_stored=12)
    f = stored.astype(np.float32)
    return Study(stored=stored, modality=f, model_input=f / 4095.0, window=(2048.0, 4096.0),
                 invert_display=False, meta=meta, study_id=f"s{seed}")


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(list(argv)))


def _vindr_coco(path: Path, boxes=VINDR_BOXES) -> Path:
    names = list(dict.fromkeys(n for n, _ in boxes))
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "vindr_001.png", "width": 512, "height": 512}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        + [{"id": 99, "name": "No finding"}],  # listed, never used: not asked about
        "annotations": [{"id": k + 1, "image_id": 7, "category_id": names.index(n) + 1, "bbox": bb}
                        for k, (n, bb) in enumerate(boxes)]}))
    return path


def _session(tmp_path: Path, label_set: str | None) -> AnnotationSession:
    s = AnnotationSession("tester")
    s.open(tmp_path / "p.cxrann", label_set=label_set)
    s.set_study(_study())
    return s


# ---- proposals of an 18-class model ------------------------------------------------------
def test_tv18_project_accepts_lung_opacity_proposal(tmp_path: Path) -> None:
    s = _session(tmp_path, "torchxrayvision18")
    assert s.label_set == TORCHXRAYVISION18
    n = s.add_proposals({"cam": [Box("Lung Opacity", 10, 10, 20, 15, 0.9),
                                 Box("Enlarged Cardiomediastinum", 30, 20, 25, 30, 0.6)]}, "xrv")
    assert n == 2
    pending = s.store.proposals(s.record.id, "pending")
    edit = s.accept_proposals([p.id for p in pending])
    assert edit.id is not None
    boxes = s.store.boxes(s.record.id)
    assert sorted(b.label for b in boxes) == ["Enlarged Cardiomediastinum", "Lung Opacity"]
    assert {b.source for b in boxes} == {"model"}
    s.close()


def test_nih14_project_refuses_unmapped_proposal_until_mapped(tmp_path: Path) -> None:
    s = _session(tmp_path, None)  # default: nih14
    assert s.label_set.name == "nih14"
    s.add_proposals([Box("Lung Opacity", 10, 10, 20, 15, 0.9), Box("infiltrate", 5, 5, 10, 10, 0.5)],
                    "xrv")
    by_label = {p.label: p.id for p in s.store.proposals(s.record.id, "pending")}
    assert set(by_label) == {"Lung Opacity", "Infiltration"}  # stored; a synonym maps on the way in
    with pytest.raises(UnmappedProposalError) as info:
        s.accept_proposals([by_label["Lung Opacity"]])
    msg = str(info.value)
    assert "'Lung Opacity'" in msg and "NIH ChestX-ray14" in msg and "add-labels" in msg
    assert "\n" not in msg and isinstance(info.value, InvalidBoxError)
    assert s.store.boxes(s.record.id) == []  # nothing was written
    s.accept_proposals([by_label["Infiltration"]])
    s.accept_proposals([by_label["Lung Opacity"]], label="consolidation")  # mapped by hand
    assert sorted(b.label for b in s.store.boxes(s.record.id)) == ["Consolidation", "Infiltration"]
    with pytest.raises(InvalidBoxError, match="unknown class 'Lung Opacity'"):
        s.draw_box("Lung Opacity", 1, 1, 5, 5)
    s.close()


def test_added_label_makes_a_proposal_acceptable(tmp_path: Path) -> None:
    s = _session(tmp_path, "nih14")
    s.add_proposals([Box("Lung Opacity", 10, 10, 20, 15, 0.9)], "xrv")
    ls = s.add_labels(["Lung Opacity"])
    assert ls.name == "nih14+custom" and ls.labels[-1] == "Lung Opacity" and len(ls) == 15
    s.accept_proposals()
    assert [b.label for b in s.store.boxes(s.record.id)] == ["Lung Opacity"]
    path = s.store.path
    s.close()
    with AnnotationStore(path, read_only=True) as ro:  # recorded in the store
        assert ro.label_set.labels == ls.labels and ro.label_set.title == "NIH ChestX-ray14 + 1 added"


# ---- COCO / NIH imports -------------------------------------------------------------------
def test_vindr_coco_imports_into_vindr_project(tmp_path: Path) -> None:
    coco = _vindr_coco(tmp_path / "vindr.json")
    assert _cli("new", str(tmp_path / "v.cxrann"), "--label-set", "vindr-cxr") == 0
    assert _cli("import", str(tmp_path / "v.cxrann"), str(coco), "--format", "coco") == 0
    with AnnotationStore(tmp_path / "v.cxrann", read_only=True) as st:
        assert st.label_set == VINDR_CXR
        (rec,) = st.studies()
        got = sorted((b.label, b.x, b.y, b.w, b.h) for b in st.boxes(rec.id))
    assert got == sorted((n, *map(float, bb)) for n, bb in VINDR_BOXES)
    out = tmp_path / "yolo"
    assert _cli("export", str(tmp_path / "v.cxrann"), str(out), "--format", "yolo") == 0
    assert (out / "classes.txt").read_text().splitlines() == list(VINDR_CXR.labels)
    first = sorted(int(line.split()[0]) for line in (out / "labels" / "vindr_001.txt").read_text().splitlines())
    assert first == sorted(VINDR_CXR.labels.index(n) for n, _ in VINDR_BOXES)


def test_vindr_coco_into_nih14_refused_then_mapped_or_added(tmp_path: Path, capsys) -> None:
    coco = _vindr_coco(tmp_path / "vindr.json")
    proj = tmp_path / "n.cxrann"
    assert _cli("new", str(proj)) == 0
    capsys.readouterr()
    assert _cli("import", str(proj), str(coco), "--format", "coco") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cxrviewer annotations: ")
    for name in ("'Aortic enlargement'", "'Nodule/Mass'", "'Lung Opacity'", "--map", "--add-unknown"):
        assert name in err
    assert "'Cardiomegaly'" not in err and "'Pleural effusion'" not in err  # these map (synonym)
    with AnnotationStore(proj, read_only=True) as st:  # nothing was written
        assert st.studies() == [] and st.edit_ids() == [] and st.label_set.name == "nih14"
    with pytest.raises(UnmappedClassesError) as info:  # the API: typed, with the names
        with AnnotationStore(proj) as st:
            import_coco(st, coco)
    assert isinstance(info.value, UnmappedLabelsError)
    assert info.value.unmapped == ("Aortic enlargement", "Nodule/Mass", "Lung Opacity")

    assert _cli("import", str(proj), str(coco), "--format", "coco", "--map", "Nodule/Mass=mass",
                "--map", "lung opacity=Consolidation", "--skip", "Aortic enlargement") == 0
    with AnnotationStore(proj, read_only=True) as st:
        (rec,) = st.studies()
        assert sorted(b.label for b in st.boxes(rec.id)) == ["Cardiomegaly", "Consolidation", "Effusion", "Mass"]
        assert st.label_set.name == "nih14"

    proj2 = tmp_path / "n2.cxrann"
    assert _cli("new", str(proj2)) == 0
    assert _cli("import", str(proj2), str(coco), "--format", "coco", "--add-unknown") == 0
    with AnnotationStore(proj2, read_only=True) as st:
        ls = st.label_set
        assert ls.labels[14:] == ("Aortic enlargement", "Nodule/Mass", "Lung Opacity")
        (rec,) = st.studies()
        assert len(st.boxes(rec.id)) == 5
    capsys.readouterr()
    assert _cli("info", str(proj2), "--json") == 0
    info_json = json.loads(capsys.readouterr().out)
    assert info_json["boxes"] == 5 and info_json["label_set"] == "nih14+custom"
    assert info_json["boxes_per_class"]["Aortic enlargement"] == 1


def test_nih_csv_lower_case_and_unknown(tmp_path: Path) -> None:
    csv = tmp_path / "b.csv"
    csv.write_text(NIH_BBOX_HEADER + "\nx.png,mass,1,2,30,40\nx.png,Infiltrate,5,5,10,10\n"
                   "y.png,Fracture,1,2,3,4\n")
    with AnnotationStore(tmp_path / "p.cxrann") as st:
        with pytest.raises(UnmappedClassesError, match=r"'Fracture'.*--map.*--add-unknown"):
            import_nih_csv(st, csv)
        assert st.studies() == [] and st.edit_ids() == []
        import_nih_csv(st, csv, mapping={"Fracture": None})
        assert sorted(b.label for r in st.studies() for b in st.boxes(r.id)) == ["Infiltration", "Mass"]
    with AnnotationStore(tmp_path / "q.cxrann", label_set="torchxrayvision18") as st:
        import_nih_csv(st, csv)  # Fracture is one of torchxrayvision's 18
        assert sorted(b.label for r in st.studies() for b in st.boxes(r.id)) == ["Fracture", "Infiltration", "Mass"]
        data = json.loads(export_store(st, tmp_path / "c.json", "coco").read_text())
        assert [c["name"] for c in data["categories"]] == list(TORCHXRAYVISION18.labels)


# ---- the store's record of the label set ----------------------------------------------------
def test_schema3_store_migrates_to_nih14_with_boxes_unchanged(tmp_path: Path) -> None:
    p = tmp_path / "old.cxrann"
    conn = sqlite3.connect(p, isolation_level=None)
    migrate(conn, target=3)
    rows = {"studies": "(file_name, content_sha256, path, width, height, created, last_seen) VALUES "
                       "('old.png', 'ab', '/d/old.png', 100, 100, 't', 't')",
            "boxes": "(study_id, label, x, y, w, h, annotator, created, modified, modified_by, source) "
                     "VALUES (1, 'Pleural_Thickening', 1.5, 2, 3, 4, 'bob', 't', 't', 'bob', 'manual')",
            "labels": "(study_id, label, state, annotator, modified) VALUES "
                      "(1, 'Pleural_Thickening', 'present', 'bob', 't')"}
    for table, values in rows.items():
        conn.execute(f"INSERT INTO {table} {values}")
    before = conn.execute("SELECT * FROM boxes").fetchall()
    conn.close()
    with AnnotationStore(p, annotator="alice") as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert s.label_set.name == "nih14"
        assert s._conn.execute("SELECT * FROM boxes").fetchall() == before
        assert s.labels(1) == {"Pleural_Thickening": "present"}
        s.add_box(1, "pleural thickening", 10, 10, 5, 5)  # spelling -> the canonical label
        assert [b.label for b in s.boxes(1)] == ["Pleural_Thickening"] * 2
    assert (tmp_path / "old.cxrann.v3.bak").exists()


def test_label_set_of_existing_project_is_kept(tmp_path: Path) -> None:
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"name": "mine", "labels": ["Tube", "Line tip"],
                                "synonyms": {"ETT": "Tube"}}))
    with AnnotationStore(tmp_path / "u.cxrann", label_set=str(user)) as st:
        sid = st.ensure_study(StudyIdentity("a.png", sha256="1" * 64), width=50, height=50).id
        st.add_box(sid, "ett", 1, 1, 5, 5)
        assert [b.label for b in st.boxes(sid)] == ["Tube"]
        with pytest.raises(InvalidBoxError, match="not in this project's label set mine"):
            st.set_label(sid, "Mass", "present")
    with AnnotationStore(tmp_path / "u.cxrann", label_set=str(user)) as st:  # the same: fine
        assert st.label_set.labels == ("Tube", "Line tip")
    with pytest.raises(AnnotationStoreError, match="keeps the label set"):
        AnnotationStore(tmp_path / "u.cxrann", label_set="vindr-cxr")
    assert _cli("new", str(tmp_path / "u.cxrann")) == 2  # never over an existing project
    assert _cli("new", str(tmp_path / "x.cxrann"), "--label-set", "no-such-set") == 2
    assert not (tmp_path / "x.cxrann").exists()


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    coco = _vindr_coco(tmp_path / "vindr.json")
    proj = tmp_path / "n.cxrann"
    assert _cli("new", str(proj)) == 0
    bad = [("import", str(proj), str(tmp_path / "missing.json"), "--format", "coco"),
           ("import", str(proj), str(coco), "--format", "coco", "--map", "Nodule/Mass"),
           ("import", str(proj), str(coco), "--format", "coco", "--map", "Nodule/Mass=Tumour"),
           ("import", str(tmp_path / "none.cxrann"), str(coco), "--format", "coco"),
           ("info", str(tmp_path / "none.cxrann"))]
    errs = []
    for argv in bad:
        capsys.readouterr()
        assert _cli(*argv) == 2, argv
        errs.append(capsys.readouterr().err)
        assert errs[-1].count("\n") == 1 and errs[-1].startswith("cxrviewer annotations: "), errs[-1]
    assert "cannot read the COCO file" in errs[0] and "SOURCE=TARGET" in errs[1]
    assert "'Tumour' is not in the NIH ChestX-ray14 label set" in errs[2]
    # an import creates a missing project, and removes it again when the import is refused
    assert "not in the project's label set" in errs[3] and "no annotation store here" in errs[4]
    assert not list(tmp_path.glob("none.cxrann*"))
    with AnnotationStore(proj, read_only=True) as st:
        assert st.studies() == [] and st.edit_ids() == [] and st.label_set.name == "nih14"


def test_damaged_label_set_row_and_foreign_labels_refused(tmp_path: Path) -> None:
    p = tmp_path / "d.cxrann"
    with AnnotationStore(p) as st:
        sid = st.ensure_study(StudyIdentity("a.png", sha256="1" * 64), width=50, height=50).id
        st.add_box(sid, "Mass", 1, 1, 5, 5)
        st._conn.execute("UPDATE boxes SET label = 'Tube'")  # a store edited by hand
        with pytest.raises(ExportError, match="outside its label set.*'Tube'") as info:
            export_store(st, tmp_path / "c.json", "coco")
        assert not (tmp_path / "c.json").exists() and "\n" not in str(info.value)
        st._conn.execute("UPDATE project SET value = '{\"labels\": 7}' WHERE key = 'label_set'")
        with pytest.raises(AnnotationStoreError, match="label set is damaged"):
            st.add_box(sid, "Mass", 1, 1, 5, 5)
        assert len(st.boxes(sid)) == 1
