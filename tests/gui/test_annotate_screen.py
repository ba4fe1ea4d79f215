"""The annotator's screen and a project that is never lost (issue 14).

The demo's phantom_002 with the shipped models' real proposals (about 70 over 14 classes):
by default only the current class's best three are drawn, under the ground truth, with
labels that cover no other label and read at >= 4.5:1; E without a project asks for one; the
last project reopens; the default project goes to the user's data folder, never into the
checkout; the results cache lives in the cache location.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import pytest
from PySide6.QtCore import QStandardPaths, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from cxrviewer.core.annotations import AnnotationStore
from cxrviewer.core.classes import CLASSES, class_colour, contrast_ratio
from cxrviewer.core.io import open_worklist
from cxrviewer.gui.annotation_controller import AnnotationController
from cxrviewer.gui.annotation_io import default_store_path, inside_app, user_data_dir
from cxrviewer.gui.inference import results_cache_dir
from cxrviewer.gui.views.box_editor import Z_BOX, Z_PROPOSAL
from cxrviewer.gui.views.layers import label_style, place_labels
from tests.gui.test_box_editor import Host, drag

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "resources" / "demo"
MODELS = REPO / "resources" / "models"


@pytest.fixture(scope="module")
def demo_results():
    """The shipped models' results on phantom_002 (CPU, once per module)."""
    import torch

    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.pipeline import Pipeline, assign_roles

    bundles = sorted(MODELS.glob("*.cxrbundle"))
    if not bundles:
        pytest.skip("no shipped models")
    torch.manual_seed(0)
    wl = open_worklist([DEMO])
    ref = next(r for r in wl.refs if r.path.name == "phantom_002.png")
    study = ref.load()
    pipe = Pipeline(assign_roles([load_bundle(p) for p in bundles]), "cpu", map_max_side=256)
    return wl, study, pipe.run(study)


@pytest.fixture
def annotating(qtbot, tmp_path, monkeypatch, demo_results):
    """A window on the demo folder, phantom_002 shown, its proposals stored, annotation mode on."""
    monkeypatch.setenv("CXRVIEWER_DATA_DIR", str(tmp_path / "appdata"))
    wl, study, res = demo_results
    host = Host()
    host.resize(1100, 900)
    qtbot.addWidget(host)
    show(qtbot, host)
    ctrl = AnnotationController.attach(host, annotator="tester")
    host.state.set_worklist(wl)
    host.state.set_study(study)
    ctrl.set_annotation_mode(True)
    ctrl.on_results(study.pixel_sha256(), res)
    yield host, ctrl, study
    ctrl.shutdown()
    host.close()


def show(qtbot, host: Host) -> None:
    host.show()
    qtbot.waitExposed(host)
    host.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is host, timeout=5000)  # window shortcuts


def shown_proposals(ctrl: AnnotationController) -> list:
    return [it for it in ctrl.editor.items if it.kind == "proposal"]


def shown_labels(host: Host, ctrl: AnnotationController) -> list:
    """Every label on the panel that can be seen (ground truth and editor), scene rects."""
    texts = list(host.panel.gt_boxes.labels) + [d.text for d in ctrl.editor._drawn.values()]
    out = []
    for t in texts:
        if t.isVisible() and t.opacity() > 0:
            t.updateTransform(force=True)
            out.append((t.toPlainText(), t.sceneBoundingRect()))
    return out


def test_default_filter_shows_the_current_class_best_three(qtbot, annotating):
    host, ctrl, _study = annotating
    pending = ctrl.store.proposals(ctrl.record.id, "pending")
    assert len(pending) > 40  # every method's boxes over 14 classes are kept in the project
    for label in ("Atelectasis", "Mass", "Cardiomegaly"):
        ctrl.edits.set_class(label)
        props = shown_proposals(ctrl)
        assert 1 <= len(props) <= 3 and {p.label for p in props} == {label}
    QTest.keySequence(host.panel, QKeySequence("Shift+C"))  # every class
    counts = Counter(p.label for p in shown_proposals(ctrl))
    assert len(counts) > 3 and max(counts.values()) <= 3
    assert len(ctrl.store.proposals(ctrl.record.id, "pending")) == len(pending)  # display only
    for p in shown_proposals(ctrl):  # the score says what it is
        cap = p.caption()
        assert (" p 0." in cap) or (" map " in cap), cap
        if p.model_name.endswith(":anatomy"):
            assert " p 0." in cap
        if p.model_name.endswith((":cam", ":attention_mining", ":gradcam")):
            assert " map " in cap
    ctrl.set_annotation_mode(False)  # view mode: no proposals unless asked for
    assert shown_proposals(ctrl) == []
    ctrl.actions.actions["annot.view_proposals"].trigger()
    assert shown_proposals(ctrl)


def test_accept_acts_on_a_shown_proposal(qtbot, annotating):
    host, ctrl, _study = annotating
    ctrl.edits.set_class("Mass")
    first = shown_proposals(ctrl)[0]
    qtbot.keyClick(host.panel, Qt.Key.Key_Y)
    (box,) = ctrl.store.boxes(ctrl.record.id)
    assert (box.label, box.proposal_id) == ("Mass", first.id)


def test_ground_truth_above_proposals_and_labels_never_overlap(qtbot, annotating):
    host, ctrl, study = annotating
    for x in (300, 330, 360):  # three drawn boxes, crowded on the ground-truth Atelectasis
        ctrl.toggle_draw()
        drag(host.panel, (x, 560), (x + 120, 700))
    QTest.keySequence(host.panel, QKeySequence("Shift+C"))  # crowded: every class's proposals
    gt_items = host.panel.gt_boxes.items
    assert gt_items and study.gt_boxes
    prop_z = [ctrl.editor.outline(p.key).zValue() for p in shown_proposals(ctrl)]
    assert max(prop_z) == Z_PROPOSAL < min(i.zValue() for i in gt_items)
    box_z = [ctrl.editor.outline(it.key).zValue() for it in ctrl.editor.items if it.kind == "box"]
    assert len(box_z) == 3 and min(box_z) >= Z_BOX > max(i.zValue() for i in gt_items)
    for zoom in (None, 2.0):
        if zoom:
            host.panel.view.scaleBy((1 / zoom, 1 / zoom))
            qtbot.wait(20)
        labels = shown_labels(host, ctrl)
        assert len(labels) >= 8
        for (ta, ra), (tb, rb) in itertools.combinations(labels, 2):
            assert not ra.intersects(rb), (ta, tb)
        gt_texts = {b.label for b in study.gt_boxes}
        assert gt_texts <= {t for t, _ in labels}  # ground-truth labels are never hidden


def test_label_text_contrast_at_least_4_5():
    for name in CLASSES:
        for proposal in (False, True):
            fg, bg = label_style(name, proposal=proposal)
            assert contrast_ratio(fg.name(), bg.name()) >= 4.5, (name, proposal)
    fg, bg = label_style("Infiltration")
    assert bg.name() == class_colour("Infiltration") and fg.name() == "#000000"
    assert label_style("Mass")[0].name() == "#ffffff"  # white on the purple


def test_place_labels_avoids_taken_spots():
    boxes = [(10.0, 10.0, 50.0, 50.0)] * 4
    spots = place_labels(boxes, [(30.0, 8.0)] * 4, taken=[(10.0, 2.0, 30.0, 8.0)], bounds=(0, 0, 200, 200))
    assert all(s is not None for s in spots)
    rects = [(10.0, 2.0, 30.0, 8.0), *spots]
    for a, b in itertools.combinations(rects, 2):
        assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3])


def test_class_persists_across_studies(qtbot, tmp_path):
    host = Host()
    qtbot.addWidget(host)
    show(qtbot, host)
    ctrl = AnnotationController.attach(host, annotator="tester")
    assert ctrl.open_store(tmp_path / "p.cxrann")
    wl = open_worklist([DEMO])
    host.state.currentIndexChanged.connect(lambda i: host.state.set_study(wl.refs[i].load()))
    host.state.set_worklist(wl)
    host.state.set_current_index(0)
    ctrl.set_annotation_mode(True)
    ctrl.edits.set_class("Cardiomegaly")
    for key in (Qt.Key.Key_D, Qt.Key.Key_A):
        qtbot.keyClick(host.panel, key)
        assert ctrl.editor.draw_label == "Cardiomegaly"
        assert ctrl.dock.class_combo.currentText() == "Cardiomegaly"
    assert host.state.current_index == 0
    ctrl.shutdown()


def test_e_without_a_project_asks_for_one(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRVIEWER_DATA_DIR", str(tmp_path / "appdata"))
    host = Host()
    qtbot.addWidget(host)
    show(qtbot, host)
    ctrl = AnnotationController.attach(host, annotator="tester")
    asked: list[Path] = []
    answers = iter([None, "default"])
    monkeypatch.setattr(ctrl.io, "choose_project", lambda default: asked.append(default) or next(answers))
    qtbot.keyClick(host.panel, Qt.Key.Key_E)
    assert len(asked) == 1 and ctrl.store is None and not ctrl.annotation_mode  # cancelled
    assert not ctrl.actions.actions["annot.mode"].isChecked()
    qtbot.keyClick(host.panel, Qt.Key.Key_E)
    assert len(asked) == 2 and ctrl.annotation_mode
    assert ctrl.store.path == tmp_path / "appdata" / "default.cxrann"
    ctrl.shutdown()


def test_the_last_project_reopens(qtbot, tmp_path):
    host = Host()
    qtbot.addWidget(host)
    first = AnnotationController.attach(host, annotator="tester")
    assert first.open_store(tmp_path / "mine.cxrann")
    first.shutdown()
    host2 = Host()
    qtbot.addWidget(host2)
    again = AnnotationController.attach(host2, annotator="tester")
    assert again.store is None  # nothing opens by itself (the app calls reopen_last at start)
    assert again.reopen_last() and again.store.path == tmp_path / "mine.cxrann"
    again.shutdown()
    (tmp_path / "mine.cxrann").unlink()
    host3 = Host()
    qtbot.addWidget(host3)
    assert not AnnotationController.attach(host3, annotator="t").reopen_last()  # gone: nothing


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_demo_project_never_written_into_the_checkout(qtbot, tmp_path, monkeypatch):
    data = tmp_path / "appdata"
    monkeypatch.setenv("CXRVIEWER_DATA_DIR", str(data))
    before = _listing(REPO / "resources")
    host = Host()
    qtbot.addWidget(host)
    show(qtbot, host)
    ctrl = AnnotationController.attach(host, annotator="tester")
    wl = open_worklist([DEMO])
    host.state.set_worklist(wl)
    host.state.set_study(wl.refs[0].load())
    monkeypatch.setattr(ctrl.io, "choose_project", lambda default: "default")
    qtbot.keyClick(host.panel, Qt.Key.Key_W)  # draw (asks for the project: the default one)
    drag(host.panel, (100, 100), (300, 260))
    assert len(ctrl.store.boxes(ctrl.record.id)) == 1
    path = ctrl.store.path
    assert path.parent == data / "projects" and path.name.startswith("demo-") and not inside_app(path)
    ctrl.shutdown()
    assert _listing(REPO / "resources") == before
    assert inside_app(DEMO) and default_store_path(str(DEMO)) == path


def test_data_and_cache_folders_are_qt_standard_locations(monkeypatch, tmp_path):
    for var in ("CXRVIEWER_DATA_DIR", "CXRVIEWER_CONFIG_DIR", "CXRVIEWER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    QStandardPaths.setTestModeEnabled(True)  # (~/.qttest/...: nothing is written here)
    try:
        app_data = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
        cache = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.CacheLocation)
        config = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppConfigLocation)
        assert user_data_dir() == Path(app_data)
        assert results_cache_dir() == Path(cache) / "results-cache"
        assert not str(results_cache_dir()).startswith(config)
    finally:
        QStandardPaths.setTestModeEnabled(False)
    monkeypatch.setenv("CXRVIEWER_CACHE_DIR", str(tmp_path / "c"))
    assert results_cache_dir() == tmp_path / "c" / "results-cache"


def test_a_new_project_logs_no_migration(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cxrviewer"):
        store = AnnotationStore(tmp_path / "brand-new.cxrann")
        store.close()
    assert not [r for r in caplog.records if "migrat" in r.getMessage()]
