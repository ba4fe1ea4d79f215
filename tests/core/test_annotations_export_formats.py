"""The exports as the field's own tools read them: COCO (score, segmentation polygon, a results
file of the model proposals) in pycocotools; YOLO in the Ultralytics dataset layout; VOC in the
VOCdevkit layout with 1-based integer pixel coordinates."""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest

from cxrviewer.cli import annotations as cli
from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.annotations.model import StudyIdentity
from cxrviewer.core.errors import ExportError
from cxrviewer.core.geometry import Box
from cxrviewer.core.annotations.export import coco_results, export_coco

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

