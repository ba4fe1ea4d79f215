"""Exports/imports: COCO and NIH CSV round-trips, VOC/YOLO layout, atomic writes, no identifiers."""
from __future__ import annotations

import gzip
import json
import os
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from cxrviewer.core.annotations import (
    NIH_BBOX_HEADER, AnnotationStore, StudyIdentity, UndoStack, export as ex,
)
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.errors import ExportError
from cxrviewer.core.geometry import Box


def _filled(path: Path) -> AnnotationStore:
    s = AnnotationStore(path, annotator="alice")
    a = s.ensure_study(StudyIdentity("IM-0001.dcm", sop_uid="1.2.826.0.1.3680043.2.1"),
                       width=2000, height=2500, path="/patients/DOE^JOHN/IM-0001.dcm").id
    b = s.ensure_study(StudyIdentity("00000001_000.png", sha256="ab" * 32), width=1024,
                       height=1024, path="/nih/images/00000001_000.png").id
    s.ensure_study(StudyIdentity("empty.png", sha256="cd" * 32), width=64, height=64)
    s.add_box(a, "Infiltration", 225.084745762712, 547.019216763771, 86.7796610169491,
              79.1864406779661)
    s.add_box(a, "Pleural_Thickening", 0.1, 0.2, 1999.9, 2499.8)
    s.add_box(b, "Mass", 1 / 3, 2 / 7, 100.123456789, 50.5)
    p = s.add_proposals(b, [Box("Nodule", 10, 20, 30, 40, 0.875)], "densenet")
    s.accept_proposal(p.ops[0].key)
    s.set_label(a, "Infiltration", "present")
    s.set_label(b, "Hernia", "uncertain")
    s.set_status(a, "verified")
    return s


def _boxes_by_name(s: AnnotationStore) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for rec in s.studies():
        bx = sorted((b.label, b.x, b.y, b.w, b.h) for b in s.boxes(rec.id))
        if bx:
            out[rec.identity.file_name] = bx
    return out


def test_coco_round_trip(tmp_path: Path) -> None:
    src = _filled(tmp_path / "src.cxrann")
    target = ex.export_coco(src, tmp_path / "out" / "coco.json")
    data = json.loads(target.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert len(data["annotations"]) == 4 and len(data["images"]) == 3
    text = target.read_text()
    assert "DOE" not in text and "1.2.826" not in text and "/patients" not in text
    model_ann = [a for a in data["annotations"] if a["cxr_source"] == "model"][0]
    assert model_ann["cxr_model"] == "densenet" and model_ann["cxr_score"] == 0.875

    dst = AnnotationStore(tmp_path / "dst.cxrann", annotator="bob")
    edit = ex.import_coco(dst, target, images_dir="/elsewhere")
    assert edit.kind == "batch" and len(edit.box_ids) == 4
    assert _boxes_by_name(dst) == _boxes_by_name(src)  # bit-exact floats
    by_name = {r.identity.file_name: r for r in dst.studies()}
    assert dst.labels(by_name["IM-0001.dcm"].id) == {"Infiltration": "present"}
    assert by_name["IM-0001.dcm"].status == "verified"
    assert by_name["00000001_000.png"].identity.sha256 == "ab" * 32  # identity carried
    assert by_name["IM-0001.dcm"].path == "/elsewhere/IM-0001.dcm"
    (mb,) = [b for b in dst.boxes(by_name["00000001_000.png"].id) if b.source == "model"]
    assert (mb.model_name, mb.score) == ("densenet", 0.875)
    # importing again adds nothing; the import is one undo step
    assert ex.import_coco(dst, target).empty
    stack = UndoStack(dst)
    stack.push(edit)
    stack.undo()
    assert _boxes_by_name(dst) == {}

    full = json.loads(ex.export_coco(src, tmp_path / "id.json", include_identifiers=True)
                      .read_text())
    assert any(im.get("cxr_sop_uid") == "1.2.826.0.1.3680043.2.1" for im in full["images"])
    src.close()
    dst.close()


def test_nih_csv_round_trip_and_header(tmp_path: Path) -> None:
    src = _filled(tmp_path / "src.cxrann")
    out = ex.export_nih_csv(src, tmp_path / "BBox_List_2017.csv")
    lines = out.read_text().splitlines()
    assert lines[0] == NIH_BBOX_HEADER == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert lines[1] == ("IM-0001.dcm,Infiltrate,225.084745762712,547.019216763771,"
                        "86.7796610169491,79.1864406779661")
    assert len(lines) == 5 and all(len(x.split(",")) == 6 for x in lines[1:])
    dst = AnnotationStore(tmp_path / "dst.cxrann", annotator="bob")
    ex.import_nih_csv(dst, out, image_size=lambda n: (2000, 2500) if n.endswith(".dcm")
                      else (1024, 1024))
    assert _boxes_by_name(dst) == _boxes_by_name(src)
    assert out.read_text() == ex.nih_csv_text(src)
    again = ex.export_nih_csv(dst, tmp_path / "again.csv")
    assert again.read_text() == out.read_text()  # export -> import -> export is byte-identical
    src.close()
    dst.close()


def test_real_nih_bbox_list_round_trips(tmp_path: Path, nih_dir: Path) -> None:
    real = nih_dir / "BBox_List_2017.csv.gz"
    s = AnnotationStore(tmp_path / "nih.cxrann", annotator="importer")
    edit = ex.import_nih_csv(s, real, images_dir=nih_dir / "images")
    raw = gzip.decompress(real.read_bytes()).decode()
    n_rows = len(raw.strip().splitlines()) - 1
    assert len(edit.box_ids) == n_rows == 984
    out = ex.export_nih_csv(s, tmp_path / "out.csv")
    # same header, same rows (order may differ: grouped by image)
    assert out.read_text().splitlines()[0] == raw.splitlines()[0]
    assert sorted(out.read_text().splitlines()[1:]) == sorted(raw.strip().splitlines()[1:])
    s.close()


def test_voc_and_yolo_layout(tmp_path: Path) -> None:
    s = _filled(tmp_path / "s.cxrann")
    folder = ex.export_voc(s, tmp_path / "voc") / "VOCdevkit" / "VOC2007"  # VOCdevkit layout
    root = ET.parse(folder / "Annotations" / "IM-0001.xml").getroot()
    assert root.findtext("filename") == "IM-0001.dcm" and root.findtext("size/width") == "2000"
    objs = root.findall("object")
    assert [o.findtext("name") for o in objs] == ["Infiltration", "Pleural_Thickening"]
    # 1-based integer pixels: xmin = round(x) + 1, xmax = round(x + w)
    assert objs[0].findtext("bndbox/xmin") == str(round(225.084745762712) + 1)
    assert objs[0].findtext("bndbox/xmax") == str(round(225.084745762712 + 86.7796610169491))
    assert "DOE" not in (folder / "Annotations" / "IM-0001.xml").read_text()
    zpath = ex.export_voc(s, tmp_path / "voc.zip")
    with zipfile.ZipFile(zpath) as zf:
        assert sorted(n for n in zf.namelist() if "/Annotations/" in n) == [
            f"VOCdevkit/VOC2007/Annotations/{n}" for n in ("00000001_000.xml", "IM-0001.xml",
                                                         "empty.xml")]
    y = ex.export_yolo(s, tmp_path / "yolo.zip")
    with zipfile.ZipFile(y) as zf:
        assert zf.read("classes.txt").decode().split() == list(CLASSES)
        rows = zf.read("labels/00000001_000.txt").decode().splitlines()
        assert zf.read("labels/empty.txt") == b""
    mass = [r for r in rows if r.startswith(f"{CLASSES.index('Mass')} ")][0].split()
    cx, cy, w, h = map(float, mass[1:])
    assert cx == pytest.approx((1 / 3 + 100.123456789 / 2) / 1024, abs=1e-7)
    assert w == pytest.approx(100.123456789 / 1024, abs=1e-7) and 0 < cy < 1 and 0 < h < 1
    s.close()


def test_failed_export_leaves_target_untouched(tmp_path: Path, monkeypatch) -> None:
    s = _filled(tmp_path / "s.cxrann")
    target = tmp_path / "coco.json"
    target.write_text("previous export")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_fsync", broken_fsync)
    for fn in (ex.export_coco, ex.export_nih_csv):
        with pytest.raises(ExportError, match="left unchanged"):
            fn(s, target)
        assert target.read_text() == "previous export"
    with pytest.raises(ExportError):
        ex.export_voc(s, tmp_path / "v.zip")
    assert not (tmp_path / "v.zip").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    # a target that cannot be replaced (a folder in its place) also fails cleanly
    (tmp_path / "taken.json").mkdir()
    (tmp_path / "taken.json" / "keep.txt").write_text("x")
    with pytest.raises(ExportError):
        ex.export_coco(s, tmp_path / "taken.json")
    assert (tmp_path / "taken.json" / "keep.txt").read_text() == "x"
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    s.close()


def test_bad_imports_write_nothing(tmp_path: Path) -> None:
    s = AnnotationStore(tmp_path / "s.cxrann")
    bad = tmp_path / "bad.csv"
    bad.write_text(NIH_BBOX_HEADER + "\nx.png,Mass,1,2,3,4\ny.png,Fracture,1,2,3,4\n")
    with pytest.raises(ExportError, match="Fracture.*--map"):
        ex.import_nih_csv(s, bad)
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 10,
                                            "height": 10}],
                                "categories": [{"id": 1, "name": "person"}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                                 "bbox": [1, 1, 2, 2]}]}))
    with pytest.raises(ExportError, match="person"):
        ex.import_coco(s, coco)
    assert s.studies() == [] and s.edit_ids() == []  # an import is all or nothing
    assert os.path.getsize(s.path) > 0
    s.close()


def test_export_store_dispatch(tmp_path: Path) -> None:
    s = _filled(tmp_path / "s.cxrann")
    for fmt, name in [("coco", "c.json"), ("voc", "voc.zip"), ("yolo", "yolo"),
                      ("NIH-CSV", "b.csv")]:
        out = ex.export_store(s, tmp_path / name, fmt)
        assert out.exists()
    assert (tmp_path / "yolo" / "classes.txt").read_text().split() == list(CLASSES)
    with pytest.raises(ExportError, match="unknown export format"):
        ex.export_store(s, tmp_path / "x", "parquet")
    s.close()
