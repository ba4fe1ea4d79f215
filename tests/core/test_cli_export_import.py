"""``cxrviewer export`` / ``cxrviewer import``: the issue-17 command names run the annotations
export/import (same code as ``cxrviewer annotations export|import`` and the GUI's menus)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cxrviewer.__main__ import main
from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.io import load_study


def test_export_then_import_round_trip(tmp_path, capsys):
    png = tmp_path / "images" / "chest.png"
    png.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)).save(png)
    with AnnotationStore(tmp_path / "a.cxrann", annotator="alice") as store:
        sid = store.register_study(load_study(png)).id
        store.add_box(sid, "Mass", 10.25, 5.5, 20.0, 30.125)
        store.add_box(sid, "Infiltration", 1.0, 2.0, 3.0, 4.0)
    out = tmp_path / "a.json"
    assert main(["export", str(tmp_path / "a.cxrann"), "--format", "coco", "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert len(coco["annotations"]) == 2 and all("segmentation" in a for a in coco["annotations"])
    new = tmp_path / "b.cxrann"  # created by the import, with the label set asked for
    assert main(["import", str(new), str(out), "--format", "coco", "--studies", str(png.parent),
                 "--label-set", "torchxrayvision18"]) == 0
    with AnnotationStore(new, read_only=True) as store:
        assert store.label_set.name == "torchxrayvision18"
        boxes = sorted((b.label, b.x, b.y, b.w, b.h) for r in store.studies() for b in store.boxes(r.id))
    assert boxes == [("Infiltration", 1.0, 2.0, 3.0, 4.0), ("Mass", 10.25, 5.5, 20.0, 30.125)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # --out is required
        main(["export", str(new), "--format", "voc"])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["import", str(tmp_path / "x.cxrann"), str(tmp_path / "missing.json"), "--format", "coco"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "x.cxrann").exists()
    assert main(["export", str(tmp_path / "nope.cxrann"), "--format", "coco", "--out", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "o.json").exists()
