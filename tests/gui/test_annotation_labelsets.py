"""The annotation GUI follows the project's label set (issue 16, item 2): class chooser, C menu,
[ ] stepping, image-label rows; unmapped proposals are mapped by choosing a class; an import
with unmapped classes opens the mapping dialog (offscreen)."""
from __future__ import annotations

import json

from PySide6.QtWidgets import QApplication

from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.labelsets import TORCHXRAYVISION18, VINDR_CXR
from cxrviewer.gui.annotation_controller import AnnotationController
from cxrviewer.gui.annotation_io import ADD, SKIP, LabelMappingDialog
from tests.gui import test_box_editor
from tests.gui.test_box_editor import make_study

host = test_box_editor.host  # the fixture: a small window with panel + state


def _open(host, path, label_set=None) -> AnnotationController:
    c = AnnotationController.attach(host, annotator="tester")
    assert c.open_store(path, label_set=label_set)
    host.state.set_study(make_study())
    c.set_annotation_mode(True)
    c.edits.flush_view()
    return c


def _combo_items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def test_class_chooser_follows_the_project_labels(host, tmp_path) -> None:
    c = _open(host, tmp_path / "v.cxrann", "vindr-cxr")
    dock = c.dock
    assert _combo_items(dock.class_combo) == list(VINDR_CXR.labels)
    assert list(dock.label_combos) == list(VINDR_CXR.labels)
    assert dock.labels_table.rowCount() == len(VINDR_CXR) == 14
    assert dock.label_set_label.text() == VINDR_CXR.display_name
    assert c.editor.draw_label == "Atelectasis"  # the NIH default class is one of VinDr's too
    c.edits.step_class(1)
    assert c.editor.draw_label == "Calcification" and dock.class_combo.currentText() == "Calcification"
    c.edits.step_class(-2)
    assert c.editor.draw_label == "Aortic enlargement"
    c.edits.step_class(-1)
    assert c.editor.draw_label == "Pulmonary fibrosis"  # wraps round the project's labels
    menu = c.edits.class_menu()
    names = [a.text().split("  ", 1)[-1] for a in menu.actions()]
    assert names == list(VINDR_CXR.labels)
    menu.close()
    dock.class_combo.activated.emit(VINDR_CXR.labels.index("Nodule/Mass"))
    assert c.editor.draw_label == "Nodule/Mass"
    c.add_box("Nodule/Mass", 40, 40, 60, 50)
    c.edits.flush_view()
    assert dock.label_combos["Nodule/Mass"].currentText() == "present"  # auto-present row
    dock.label_combos["ILD"].setCurrentIndex(3)  # uncertain
    assert c.store.labels(c.record.id)["ILD"] == "uncertain"
    c.close_store()
    assert _combo_items(dock.class_combo) == list(CLASSES)  # no project: the NIH 14


def test_unmapped_proposal_is_mapped_by_choosing_a_class(host, tmp_path) -> None:
    c = _open(host, tmp_path / "n.cxrann")  # nih14
    assert c.edits.add_model_proposals({"cam": [Box("Lung Opacity", 30, 30, 80, 60, 0.9)]}, "xrv") == 1
    note = host.statusBar().currentMessage()
    assert "not in the project's labels" in note and "Lung Opacity" in note and "Shift+C" in note
    c.edits.set_proposal_view(all_classes=True)
    (prop,) = [it for it in c.editor.items if it.kind == "proposal"]
    assert prop.label == "Lung Opacity"  # shown as the model named it
    c.editor.select([prop.key])
    c.edits.accept_proposal()
    assert c.store.boxes(c.record.id) == []  # refused: not in the project's labels
    assert "not in this project's label set" in host.statusBar().currentMessage()
    c.editor.select([prop.key])
    c.edits.set_class("Consolidation")  # the mapping: accepted as the chosen class
    (box,) = c.store.boxes(c.record.id)
    assert (box.label, box.source, box.model_name) == ("Consolidation", "model", "xrv:cam")


def test_tv18_project_accepts_lung_opacity_in_the_gui(host, tmp_path) -> None:
    c = _open(host, tmp_path / "t.cxrann", "torchxrayvision18")
    assert _combo_items(c.dock.class_combo) == list(TORCHXRAYVISION18.labels)
    c.edits.set_class("Lung Opacity")
    c.edits.add_model_proposals({"cam": [Box("Lung Opacity", 30, 30, 80, 60, 0.9)]}, "xrv")
    c.edits.accept_proposal()
    assert [b.label for b in c.store.boxes(c.record.id)] == ["Lung Opacity"]


def test_import_with_unmapped_classes_offers_a_mapping(host, tmp_path, qtbot) -> None:
    coco = tmp_path / "vindr.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "Aortic enlargement"}, {"id": 2, "name": "Nodule/Mass"},
                       {"id": 3, "name": "Other lesion"}, {"id": 4, "name": "mass"}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": i + 1, "bbox": [10 * i + 1, 5, 20, 20]}
                        for i in range(4)]}))
    c = _open(host, tmp_path / "n.cxrann")
    asked = []

    def cancel(parent, unmapped, label_set):
        asked.append((list(unmapped), label_set.name))
        return None

    c.io.ask_mapping = cancel
    assert c.io.import_from("coco", coco) is None
    assert asked == [(["Aortic enlargement", "Nodule/Mass", "Other lesion"], "nih14")]
    msg = host.statusBar().currentMessage()
    assert "Import failed" in msg and "'Other lesion'" in msg
    assert [r.identity.file_name for r in c.store.studies()] == ["s0.png"]  # nothing imported

    dlg = LabelMappingDialog(asked[0][0], CLASSES, "NIH ChestX-ray14")
    qtbot.addWidget(dlg)
    assert [dlg.combos["Nodule/Mass"].itemText(i) for i in range(3)] == [ADD, SKIP, CLASSES[0]]
    dlg.choose("Nodule/Mass", "Mass")
    dlg.choose("Other lesion", SKIP)  # Aortic enlargement: left on ADD
    assert dlg.choices() == ({"Nodule/Mass": "Mass", "Other lesion": None}, True)
    c.io.ask_mapping = lambda parent, unmapped, ls: dlg.choices()
    edit = c.io.import_from("coco", coco)
    assert edit is not None and len(edit.box_ids) == 3
    rec = next(r for r in c.store.studies() if r.identity.file_name == "a.png")
    assert sorted(b.label for b in c.store.boxes(rec.id)) == ["Aortic enlargement", "Mass", "Mass"]
    QApplication.processEvents()
    c.edits.flush_view()
    assert _combo_items(c.dock.class_combo)[-1] == "Aortic enlargement"  # the dock follows the store
    with AnnotationStore(c.store.path, read_only=True) as ro:
        assert ro.label_set.labels[14:] == ("Aortic enlargement",)


def test_class_of_new_boxes_becomes_one_of_the_project_labels(host, tmp_path) -> None:
    c = _open(host, tmp_path / "r.cxrann", "rsna-pneumonia")
    assert _combo_items(c.dock.class_combo) == ["Lung Opacity"]
    assert c.editor.draw_label == "Lung Opacity"  # Atelectasis is not one of its labels
    c.add_box(c.editor.draw_label, 20, 20, 50, 40)
    assert [b.label for b in c.store.boxes(c.record.id)] == ["Lung Opacity"]


def test_new_project_asks_its_label_set(host, tmp_path, monkeypatch) -> None:
    from cxrviewer.gui import annotation_io

    c = AnnotationController.attach(host, annotator="tester")
    offered = []

    def pick(_parent, _title, _label, items, _current, _editable):
        offered.extend(items)
        return next(i for i in items if i.endswith("(torchxrayvision18)")), True

    monkeypatch.setattr(annotation_io.QInputDialog, "getItem", staticmethod(pick))
    monkeypatch.setattr(c.io, "new_project_path", lambda _default: str(tmp_path / "x.cxrann"))
    c.new_store_dialog()
    assert len(offered) == 6 and offered[-1].startswith("From a file")  # 5 built in + a file
    assert c.store is not None and c.store.label_set == TORCHXRAYVISION18
    assert _combo_items(c.dock.class_combo) == list(TORCHXRAYVISION18.labels)
    monkeypatch.setattr(annotation_io.QInputDialog, "getItem", staticmethod(lambda *a: ("", False)))
    monkeypatch.setattr(c.io, "new_project_path", lambda _default: str(tmp_path / "y.cxrann"))
    c.new_store_dialog()  # cancelled: no project made
    assert not (tmp_path / "y.cxrann").exists() and c.store.path.name == "x.cxrann"
