"""End to end: boxes drawn through the GUI on phantoms -> "Fine-tune on my annotations" ->
the new bundle loads and localises the held-out phantoms better than the bundle before.

Marked ``slow`` (deselected by default; ``pytest -m slow tests/gui/test_finetune_e2e.py``): two CIA-Net
trainings (tiny backbone, 128 px, 6 epochs, ~220 phantoms) in separate ``cxr-train``
processes take a few CPU-minutes, over the CI budget.

* the training folder is the phantom set with an **empty** box list, so every box the
  trainer sees comes from the annotation store;
* "before": ``cxr-train cia --data TRAIN`` (no boxes: 0 revealed images);
* "after": the controller's fine-tune job, ``cxr-train cia --data TRAIN --annotations STORE``
  with the boxes an annotator drew with real mouse drags (ground truth of the phantoms);
* both bundles are loaded with :func:`cxrviewer.core.bundle.load_bundle` and scored with the
  CIA evaluation (T(IoU) = 0.3 accuracy, cia-net Sec. 4.4) on the held-out fold.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

pytestmark = pytest.mark.slow  # two CPU trainings, a few minutes

SIZE = 128
N_ANNOTATED = 60
TRAIN_ARGS = ["--backbone", "tiny", "--arch-kwargs", '{"head_channels": 32}', "--size", str(SIZE),
              "--epochs", "6", "--batch-size", "16", "--lr", "3e-3", "--optimizer", "adam",
              "--lr-step-epochs", "5", "--weight-decay", "0", "--no-augment", "--box-fraction", "1.0",
              "--device", "cpu", "--no-resume", "--seed", "0", "--fold", "0", "--n-folds", "5"]
TRAIN_TIMEOUT_MS = 30 * 60 * 1000


def _phantoms(tmp_path: Path) -> tuple[Path, Path]:
    from training.phantoms import PhantomConfig, write_phantom_dataset

    cfg = PhantomConfig(contrast=1.5, normal_fraction=0.35, max_findings=1, lesion_scale=1.3,
                        affine_rotation=2.4, affine_scale=0.024, affine_shift=0.015,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0),
                                       ("Pneumothorax", 1.0), ("Infiltration", 1.0)))
    full = tmp_path / "full"
    write_phantom_dataset(full, n=280, size=SIZE, seed=3, config=cfg)
    train = tmp_path / "train"
    train.mkdir()
    shutil.copy(full / "Data_Entry_2017.csv", train / "Data_Entry_2017.csv")
    header = (full / "BBox_List_2017.csv").read_text().splitlines()[0]
    (train / "BBox_List_2017.csv").write_text(header + "\n")  # no boxes but the store's
    shutil.copytree(full / "images", train / "images")
    return full, train


def _loc_accuracy(bundle_path: str, val_ds) -> float:
    from cxrviewer.core.bundle import load_bundle
    from training.trainers.cia import bank_negatives, evaluate_cia

    b = load_bundle(bundle_path)
    return float(evaluate_cia(b.model, val_ds, bank_negatives(b, val_ds))["loc_iou_0.3"])


def test_boxes_drawn_in_the_gui_improve_the_finetuned_bundle(qtbot, tmp_path):
    from tests.gui.test_box_editor import Host, assert_in_sync, drag

    from cxrviewer.core import io as cio
    from cxrviewer.gui.annotation_controller import AnnotationController
    from cxrviewer.gui.finetune import FineTuneJob
    from training.data import ChestDataset, load_records, split_records

    full, train = _phantoms(tmp_path)
    records = load_records(full)
    train_r, val_r = split_records(records, fold=0, n_folds=5, seed=0)
    todo = [r for r in train_r if r.boxes][:N_ANNOTATED]
    assert len(todo) >= 40

    # "before" starts at once in its own process, while the annotator draws
    before = tmp_path / "before.cxrbundle"
    job0 = FineTuneJob(["cia", "--data", str(train), "--out", str(before), *TRAIN_ARGS], before)
    ready0 = qtbot.waitSignal(job0.bundleReady, timeout=TRAIN_TIMEOUT_MS, raising=True)
    job0.start()

    host = Host()
    qtbot.addWidget(host)
    host.show()
    qtbot.waitExposed(host)
    host.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is host, timeout=5000)  # window shortcuts
    ctrl = AnnotationController.attach(host, annotator="e2e")
    store_path = tmp_path / "phantoms.cxrann"
    assert ctrl.open_store(store_path)
    n_boxes = 0
    for rec in todo:  # an annotator draws each ground-truth box with the mouse
        host.state.set_study(cio.load_study(rec.path))
        ctrl.set_annotation_mode(True)
        for b in rec.boxes:
            ctrl.edits.set_class(b.label)
            ctrl.toggle_draw()
            drag(host.panel, (b.x, b.y), (b.x + b.w, b.y + b.h))
            n_boxes += 1
        rows = assert_in_sync(ctrl)
        assert len(rows) == len(rec.boxes)
        for row, b in zip(rows, rec.boxes):
            assert row[1] == b.label and row[2:] == pytest.approx((b.x, b.y, b.w, b.h), abs=1.0)
        qtbot.keyClick(host.panel, Qt.Key.Key_Space)  # done
        assert ctrl.record.status == "done"

    after = tmp_path / "after.cxrbundle"
    with qtbot.waitSignal(ctrl.bundleReady, timeout=TRAIN_TIMEOUT_MS) as got:
        job = ctrl.start_finetune(out=after, args=["cia", "--data", str(train), "--annotations",
                                                   str(store_path), "--out", str(after), *TRAIN_ARGS])
        assert job is not None
    assert got.args == [str(after)]
    ready0.wait()
    assert job0.bundle == str(before)

    val_ds = ChestDataset(val_r, SIZE, seed=0)
    acc_before, acc_after = _loc_accuracy(str(before), val_ds), _loc_accuracy(str(after), val_ds)
    print({"boxes_drawn": n_boxes, "studies": len(todo), "loc_iou0.3_before": acc_before,
           "loc_iou0.3_after": acc_after})
    assert acc_after >= 0.15 and acc_after >= acc_before + 0.1, (acc_before, acc_after)
    ctrl.shutdown()
