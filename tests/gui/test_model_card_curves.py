"""The model card window draws the card's ROC, precision-recall and reliability curves (pyqtgraph)."""
from __future__ import annotations

import numpy as np
import pytest

from cxrviewer.core.curves import curves_json, thin_curves
from cxrviewer.core.model_card import write_model_card
from cxrviewer.gui.widgets.model_card import ALL_CLASSES, ModelCardDialog, bundle_card_curves
from cxrviewer.gui.widgets.model_picker import ModelPicker
from tests.core._tiny_bundles import make_tiny_bundles

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]


@pytest.fixture
def carded(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random((60, 3))
    y = (rng.random((60, 3)) < p).astype(float)
    curves = thin_curves(curves_json(p, y, CLASSES), 51)
    card = {"data": "phantoms", "mean_auroc": 0.7, "auroc": {c: curves["roc"][c]["auc"] for c in CLASSES},
            "curves": curves}
    path = make_tiny_bundles(tmp_path, ("classifier",))["classifier"]
    write_model_card(path, card)
    return path, curves


def _lines(plot):
    return [i for i in plot.plot.getPlotItem().listDataItems()]


def test_card_window_draws_every_curve_and_one_class(qtbot, carded, tmp_path):
    path, curves = carded
    picker = ModelPicker()
    qtbot.addWidget(picker)
    picker.set_folders([str(path.parent)])
    row = next(i for i, b in enumerate(picker.bundles) if b.path == path)
    dlg = picker.show_card(row)
    qtbot.addWidget(dlg)
    assert dlg.tabs is not None and [dlg.tabs.tabText(i) for i in range(dlg.tabs.count())] == \
        ["Card", "ROC", "Precision-recall", "Calibration"]
    roc = dlg.plots["roc"]
    assert roc.drawn == CLASSES and len(_lines(roc)) == 4  # three classes and the chance diagonal
    first = _lines(roc)[0]
    xs, ys = first.getData()
    assert list(xs) == curves["roc"]["Atelectasis"]["fpr"] and list(ys) == curves["roc"]["Atelectasis"]["tpr"]
    roc.chooser.setCurrentText("Effusion")
    assert roc.drawn == ["Effusion"] and len(_lines(roc)) == 2
    pr = dlg.plots["pr"]
    pr.chooser.setCurrentText("Cardiomegaly")
    names = [i.name() for i in _lines(pr)]
    assert names[0].startswith("Cardiomegaly (AP ") and names[1].startswith("prevalence ")
    assert dlg.plots["calibration"].drawn == ["all"]
    assert any("Curves: ROC" in line for line in dlg.lines)
    roc.chooser.setCurrentText(ALL_CLASSES)
    assert len(roc.drawn) == 3
    dlg.close()


def test_a_card_without_curves_is_text_only(qtbot, tmp_path):
    path = make_tiny_bundles(tmp_path, ("classifier",))["classifier"]
    assert bundle_card_curves(path) == {"roc": {}, "pr": {}, "calibration": {}}
    assert bundle_card_curves(tmp_path / "missing") == {"roc": {}, "pr": {}, "calibration": {}}
    dlg = ModelCardDialog("x", ["No model card"], curves=bundle_card_curves(path))
    qtbot.addWidget(dlg)
    assert dlg.tabs is None and dlg.plots == {}
