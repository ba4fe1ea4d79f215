"""The annotation project's "DICOM SR + GSPS…" export and "DICOM SR / GSPS…" import menu entries,
and "COCO results (model proposals)…" (offscreen Qt): they run the CLI's code
(cxrviewer.core.dicom_objects.exchange, the coco-results exporter) and say what happened in one
status-bar line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtWidgets import QFileDialog

pytest.importorskip("highdicom")
pydicom_data = pytest.importorskip("pydicom.data")

from cxrviewer.core.dicom_objects import exchange  # noqa: E402
from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.io import load_study  # noqa: E402
from cxrviewer.gui.annotation_controller import AnnotationController  # noqa: E402
from tests.gui import test_box_editor  # noqa: E402

host = test_box_editor.host  # the fixture: a small window with panel + state


def _rg1() -> str:
    try:
        return pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # noqa: BLE001 - pydicom-data not installed or file missing
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")


def _rows(ctrl):
    sid = ctrl.session.record.id
    return sorted((b.label, round(b.x, 3), round(b.y, 3), round(b.w, 3), round(b.h, 3), b.source)
                  for b in ctrl.session.store.boxes(sid))


def test_dicom_menu_entries_export_and_import(host, tmp_path, monkeypatch):
    ctrl = AnnotationController.attach(host, annotator="tester")
    said: list[str] = []
    ctrl.feedback.message.connect(said.append)
    assert ctrl.open_store(tmp_path / "a.cxrann")
    host.state.set_study(load_study(_rg1()))
    ctrl.add_box("Nodule", 100.5, 200.25, 50.0, 60.75)
    ctrl.add_box("Mass", 900.0, 1200.0, 400.125, 300.0)
    before = _rows(ctrl)
    assert len(before) == 2
    exp, imp = ctrl.actions.export["dicom"], ctrl.actions.imports["dicom-sr"]
    assert exp.text() == "DICOM SR + GSPS…" and imp.text() == "DICOM SR / GSPS / SEG…"
    assert exp.isEnabled() and imp.isEnabled()
    calls = []
    real = exchange.export_dicom
    monkeypatch.setattr(exchange, "export_dicom", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = tmp_path / "dicom"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), "Folder (*)"))
    exp.trigger()
    assert calls == [{"kinds": ("sr", "gsps")}]  # the CLI's function, SR + GSPS
    assert sorted(p.name for p in (out / "RG1_UNCR").iterdir()) == ["PR.dcm", "SR.dcm"]
    assert said[-1].startswith("Exported DICOM SR + GSPS (1 study, 2 DICOM files")
    # an export over a folder of other files: one line, nothing written
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert ctrl.io.export_to("dicom", occupied) is None
    assert said[-1].startswith("Export failed:") and "\n" not in said[-1]
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    # import into a fresh project: the SR beside no image, so the study must be open there
    assert ctrl.open_store(tmp_path / "b.cxrann")
    host.state.set_study(load_study(_rg1()))
    assert _rows(ctrl) == []
    monkeypatch.setattr(QFileDialog, "getOpenFileName",
                        lambda *a, **k: (str(out / "RG1_UNCR" / "SR.dcm"), ""))
    imp.trigger()
    assert said[-1].startswith("Imported 2 box(es)")
    assert _rows(ctrl) == before
    ctrl.edits.undo()  # one undo step
    assert _rows(ctrl) == []
    # the GSPS (same function) and a bad file: one line, nothing added
    assert ctrl.io.import_from("dicom-sr", out / "RG1_UNCR" / "PR.dcm") is not None
    assert _rows(ctrl) == before
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(np.arange(300, dtype=np.uint8).tobytes())
    assert ctrl.io.import_from("dicom-sr", bad) is None
    assert said[-1].startswith("Import failed:") and "cannot read the DICOM file" in said[-1]
    assert "\n" not in said[-1] and _rows(ctrl) == before
    assert Path(out).is_dir()
    ctrl.shutdown()


def test_dicom_seg_menu_entry(host, tmp_path, monkeypatch):
    """"DICOM SEG…" runs the CLI's dicom-seg export (stored analyses, the app's results cache, else
    the bundled segmentation model) and its SEG comes back through the import entry."""
    from cxrviewer.core import seg_export
    from cxrviewer.core.bundle import default_models_dir

    if not (default_models_dir() / seg_export.SEGMENTATION_BUNDLE).is_dir():
        pytest.skip("the bundled segmentation model is not in resources/models")
    ctrl = AnnotationController.attach(host, annotator="tester")
    said: list[str] = []
    ctrl.feedback.message.connect(said.append)
    assert ctrl.open_store(tmp_path / "a.cxrann")
    host.state.set_study(load_study(_rg1()))
    act = ctrl.actions.export["dicom-seg"]
    assert act.text() == "DICOM SEG (lung/heart masks, finding maps)…"
    calls = []
    real = seg_export.export_dicom_seg
    monkeypatch.setattr(seg_export, "export_dicom_seg",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    out = tmp_path / "seg"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), "Folder (*)"))
    written: list[Path] = []
    ctrl.io.exported.connect(written.append)
    act.trigger()  # on a worker thread: the window stays usable, a second export is refused
    assert ctrl.io.exporting and said[-1].startswith("Exporting DICOM SEG in the background")
    act.trigger()
    assert "already running" in said[-1]
    assert ctrl.io.wait_for_export() and not ctrl.io.exporting and written == [out]
    assert len(calls) == 1 and [p.name for p in calls[0]["results"]] == ["results-cache"]
    assert said[-1].startswith("Exported DICOM SEG (lung/heart masks, finding maps) (1 study, 1 DICOM")
    assert "with masks by the segmentation model" in said[-1]
    assert [p.name for p in (out / "RG1_UNCR").iterdir()] == ["SEG.dcm"]
    # the import entry reads it back: lungs and heart are not findings of NIH-14 (none added)
    assert ctrl.io.import_from("dicom-sr", out / "RG1_UNCR" / "SEG.dcm") is None
    assert said[-1].startswith("Import failed:") and "3 anatomy segments" in said[-1]
    assert _rows(ctrl) == []
    out = tmp_path / "seg2"  # closing the project waits for its export
    act.trigger()
    ctrl.close_store()
    assert written[-1] == out and (out / "RG1_UNCR" / "SEG.dcm").is_file() and not ctrl.io.exporting
    ctrl.shutdown()


def test_coco_results_menu_entry(host, tmp_path, monkeypatch):
    """"COCO results (model proposals)…" writes the CLI's coco-results file, or says why not."""
    ctrl = AnnotationController.attach(host, annotator="tester")
    said: list[str] = []
    ctrl.feedback.message.connect(said.append)
    assert ctrl.open_store(tmp_path / "a.cxrann")
    host.state.set_study(test_box_editor.make_study())
    act = ctrl.actions.export["coco-results"]
    assert act.text() == "COCO results (model proposals)…"
    out = tmp_path / "res.json"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    act.trigger()
    assert said[-1].startswith("Export failed:") and "no model proposals" in said[-1]
    assert not out.exists()
    store = ctrl.session.store
    store.add_proposals(ctrl.session.record.id, [Box("Mass", 10.0, 20.0, 30.0, 40.0, 0.75)], "m")
    act.trigger()
    assert json.loads(out.read_text()) == [{"image_id": ctrl.session.record.id, "category_id":
                                            store.label_set.index("Mass") + 1,
                                            "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.75}]
    ctrl.shutdown()
