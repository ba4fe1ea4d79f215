"""The exports as the field's own tools read them: COCO (score, segmentation polygon, a results
file of the model proposals) in pycocotools; YOLO in the Ultralytics dataset layout; VOC in the
VOCdevkit layout with 1-based integer pixel coordinates."""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import os
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cxrviewer.cli import annotations as cli
from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.annotations.model import StudyIdentity
from cxrviewer.core.errors import ExportError
from cxrviewer.core.geometry import Box
from cxrviewer.core.annotations.export import (
    MISSING_LIST, VOC_ROOT, coco_results, export_coco, export_voc,
)

W, H = 200, 160
MODEL = "densenet121-res224-all"
GT = {  # study name -> [(class, x, y, w, h)]
    "a.png": [("Nodule", 10.5, 20.25, 30.0, 40.5), ("Mass", 100.0, 60.0, 50.0, 50.0)],
    "b.png": [("Effusion", 20.0, 30.0, 120.0, 90.0)],
}


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args([str(a) for a in argv]))


@pytest.fixture
def project(tmp_path):
    """Two studies with ground-truth boxes; the model proposed each box (score 0.9, one
    accepted) plus one false positive with a low score."""
    path = tmp_path / "p.cxrann"
    with AnnotationStore(path, annotator="alice") as st:
        for i, (name, boxes) in enumerate(GT.items()):
            Image.fromarray(np.full((H, W), 40 * i, np.uint8)).save(tmp_path / name)
            sid = st.ensure_study(StudyIdentity(name, sha256=f"{i:064x}"), width=W, height=H,
                                  path=str(tmp_path / name)).id
            props = [Box(c, x, y, w, h, 0.9) for c, x, y, w, h in boxes]
            props.append(Box("Nodule", 150.0, 120.0, 20.0, 20.0, 0.05 + i / 100))
            st.add_proposals(sid, props, MODEL)
            first = st.proposals(sid)[0]
            st.accept_proposal(first.id)  # a model box (score kept)
            for c, x, y, w, h in boxes[1:]:
                st.add_box(sid, c, x, y, w, h)
    return path


def test_coco_has_score_segmentation_and_area(project, tmp_path):
    with AnnotationStore(project, read_only=True) as st:
        out = export_coco(st, tmp_path / "gt.json")
    anns = json.loads(out.read_text())["annotations"]
    assert len(anns) == 3
    for a in anns:
        x, y, w, h = a["bbox"]
        assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
        assert a["area"] == w * h
        assert ("score" in a) == (a["cxr_source"] == "model")  # model boxes only
        assert a.get("score") == a["cxr_score"] or a["cxr_source"] == "manual"
    assert sum(a["cxr_source"] == "model" for a in anns) == 2 and \
        all(a["score"] == 0.9 for a in anns if "score" in a)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_coco_results_loads_and_evaluates_in_pycocotools(project, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, res = tmp_path / "gt.json", tmp_path / "res.json"
    assert _cli("export", project, gt, "--format", "coco") == 0
    assert _cli("export", project, res, "--format", "coco-results") == 0
    dets = json.loads(res.read_text())
    assert len(dets) == 5 and all(set(d) == {"image_id", "category_id", "bbox", "score"}
                                  for d in dets)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        coco = COCO(str(gt))
        for ann in coco.loadAnns(coco.getAnnIds()):
            m = coco.annToMask(ann)
            x, y, w, h = ann["bbox"]
            assert m.shape == (H, W) and abs(int(m.sum()) - w * h) <= w + h + 1
        dt = coco.loadRes(str(res))
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert "Average Precision" in said.getvalue()
    # every ground-truth box was proposed (0.9) above both false positives (0.05, 0.06)
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[8] == pytest.approx(1.0)


def test_coco_results_refuses_mixed_models_and_nothing(project, tmp_path, capsys):
    with AnnotationStore(project) as st:
        sid = st.studies()[0].id
        st.add_proposals(sid, [Box("Mass", 1.0, 2.0, 3.0, 4.0, 0.5)], "other-model")
        with pytest.raises(ExportError, match="proposals of 2 models"):
            coco_results(st)
        assert len(coco_results(st, model="other-model")) == 1
        with pytest.raises(ExportError, match="no model proposals"):
            coco_results(st, model="nobody")
    assert _cli("export", project, tmp_path / "r.json", "--format", "coco-results") == 2
    assert "--model NAME" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert _cli("export", project, tmp_path / "r.json", "--format", "coco-results",
                "--model", MODEL) == 0
    assert len(json.loads((tmp_path / "r.json").read_text())) == 5
    assert np.isfinite([d["score"] for d in json.loads((tmp_path / "r.json").read_text())]).all()


def test_coco_round_trip_keeps_scores(project, tmp_path):
    with AnnotationStore(project, read_only=True) as st:
        export_coco(st, tmp_path / "gt.json")
        want = sorted((b.label, b.x, b.source, b.score) for r in st.studies() for b in st.boxes(r.id))
    assert _cli("import", tmp_path / "new.cxrann", tmp_path / "gt.json", "--format", "coco") == 0
    with AnnotationStore(tmp_path / "new.cxrann", read_only=True) as st:
        got = sorted((b.label, b.x, b.source, b.score) for r in st.studies() for b in st.boxes(r.id))
    assert got == want



def _with_dicom_study(project: Path) -> None:
    with AnnotationStore(project) as st:
        sid = st.ensure_study(StudyIdentity("c.dcm", sop_uid="1.2.3.4"), width=W, height=H,
                              path="/nowhere/c.dcm").id
        st.add_box(sid, "Mass", 0.4, 159.0, 199.9, 1.0)  # touches three image edges


def _label_path(image: str) -> str:
    """Ultralytics' rule (``img2label_paths``): /images/ -> /labels/, suffix -> .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def test_yolo_is_an_ultralytics_dataset(project, tmp_path):
    _with_dicom_study(project)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "e.jpg")
    with AnnotationStore(project) as st:
        sid = st.ensure_study(StudyIdentity("e.png", sha256="e" * 64), width=W, height=H,
                              path=str(tmp_path / "e.jpg")).id
        st.add_box(sid, "Mass", 1.0, 2.0, 3.0, 4.0)
    out = tmp_path / "yolo"
    assert _cli("export", project, out, "--format", "yolo") == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    with AnnotationStore(project, read_only=True) as st:
        labels = list(st.label_set.labels)
    assert data["path"] == str(out.resolve()) and data["train"] == data["val"] == "images"
    assert data["names"] == dict(enumerate(labels))
    images = sorted((out / "images").iterdir())
    # copies of the images, named by the file's own kind (e.png was met as a JPEG copy e.jpg)
    assert [p.name for p in images] == ["a.png", "b.png", "e.jpg"]
    assert images[2].read_bytes() == (tmp_path / "e.jpg").read_bytes()
    for img in images[:2]:
        assert img.read_bytes() == (tmp_path / img.name).read_bytes() and not img.is_symlink()
        rows = [r.split() for r in Path(_label_path(str(img))).read_text().splitlines()]
        want = GT[img.name]
        assert [labels[int(r[0])] for r in rows] == [c for c, *_ in want]
        for r, (_c, x, y, w, h) in zip(rows, want):
            assert np.allclose([float(v) for v in r[1:]],
                               [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], atol=1e-7)
    assert (out / "labels" / "c.txt").is_file()  # DICOM: labels, no image (listed)
    assert (out / MISSING_LIST).read_text().startswith("c.dcm\tnot an image file")
    (out / "labels.cache").write_bytes(b"Ultralytics' label cache")
    assert _cli("export", project, out, "--format", "yolo") == 0  # its own export: replaced
    assert not (out / "labels.cache").exists()
    z = tmp_path / "yolo.zip"
    assert _cli("export", project, z, "--format", "yolo") == 0
    with zipfile.ZipFile(z) as zf:
        assert {"data.yaml", "images/a.png", "labels/a.txt", "labels/c.txt"} <= set(zf.namelist())
        assert yaml.safe_load(zf.read("data.yaml"))["path"] == "."


def test_voc_is_a_vocdevkit_with_1_based_integer_pixels(project, tmp_path):
    _with_dicom_study(project)
    with AnnotationStore(project, read_only=True) as st:
        out = export_voc(st, tmp_path / "voc") / VOC_ROOT
        stems = sorted(p.stem for p in (out / "Annotations").iterdir())
        assert stems == ["a", "b", "c"]
        assert (out / "ImageSets" / "Main" / "trainval.txt").read_text().split() == stems
        assert (out / "ImageSets" / "Main" / "Mass_trainval.txt").read_text().splitlines() == [
            "a  1", "b -1", "c  1"]
        assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == ["a.png", "b.png"]
        boxes = {**GT, "c.dcm": [("Mass", 0.4, 159.0, 199.9, 1.0)]}
        for name, want in boxes.items():
            root = ET.parse(out / "Annotations" / f"{Path(name).stem}.xml").getroot()
            assert root.findtext("filename") == name
            assert (out / "JPEGImages" / name).is_file() == name.endswith(".png")
            objs = root.findall("object")
            assert len(objs) == len(want)
            for obj, (c, x, y, w, h) in zip(objs, want):
                e = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
                assert obj.findtext("name") == c
                assert 1 <= e[0] <= e[2] <= W and 1 <= e[1] <= e[3] <= H
                assert np.allclose([e[0] - 1, e[1] - 1, e[2], e[3]], [x, y, x + w, y + h],
                                   atol=0.5)
        edge = ET.parse(out / "Annotations" / "c.xml").getroot().find("object/bndbox")
        assert [edge.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")] == [
            "1", "160", str(W), str(H)]  # clamped to the image, never 0 or past its size
