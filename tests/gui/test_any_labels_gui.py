"""The viewer follows the loaded model's classes (issue 16): an 18-class torchxrayvision-style
bundle gives 18 findings rows before and after the analysis, its classes drive the panels, and
the window says which panels the model set cannot fill and why (Messages, the models tooltip,
and the panel placeholders under View > Show panels the models cannot fill)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from test_any_labels import PHANTOM, XRV, save_classifier  # noqa: E402

from cxrviewer.gui.main_window import MainWindow  # noqa: E402
import test_explain_window as _windows  # noqa: E402

make_win, tiny_models = _windows.make_win, _windows.tiny_models  # the window fixture (and its models)

WAIT_MS = 60_000
CIA_REASON = "needs a CIA model with a normal bank (not loaded)"


@pytest.fixture(scope="module")
def xrv_only(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("xrv-only")
    save_classifier(d, XRV, "torchxrayvision18")
    return d


@pytest.fixture
def win(make_win, xrv_only) -> MainWindow:
    return make_win(models_dir=xrv_only)


def _rows(win: MainWindow) -> list[str]:
    return [win.findings.item(r, 0).text() for r in range(win.findings.rowCount())]


def test_18_class_model_rows_classes_and_not_available_reasons(qtbot, win):
    # before any study: the loaded model's 18 classes, not the NIH 14
    assert _rows(win) == XRV
    assert win.grid.unavailable["contrast"] == CIA_REASON
    assert "Contrast attention dM: " + CIA_REASON in win.models_label.toolTip()
    assert "18 classes (torchxrayvision (18 pathologies))" in win.models_label.toolTip()
    assert any("Contrast attention dM: " + CIA_REASON in text for _lvl, text in win.log_panel.messages)
    assert "contrast" not in win.grid.shown_order()  # hidden by default

    with qtbot.waitSignal(win.inference.finished, timeout=WAIT_MS) as blocker:
        win.open_paths([str(PHANTOM)])
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    res = blocker.args[1]
    assert list(res.classes) == XRV and win.findings.rowCount() == 18
    assert sorted(_rows(win)) == sorted(XRV)

    # choose Lung Opacity (not an NIH class): CAM, Grad-CAM and H_f show its maps
    c = XRV.index("Lung Opacity")
    win.findings.selectRow(_rows(win).index("Lung Opacity"))
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    assert win.grid.class_index == c and win.grid.class_name == "Lung Opacity"
    for key, (ex, name) in {"original": ("cam", "cam"), "gradcam": ("gradcam", "gradcam"),
                            "am_final": ("attention_mining", "final")}.items():
        shown = win.grid.panels[key].map.data
        assert shown is not None and np.array_equal(shown, res.get(ex, name)[c]), key
        assert "Lung Opacity" in win.grid.panels[key].content.caption, key
    # the prior has no box for it and the grid says why
    assert "NIH classes only: not for Lung Lesion, Fracture, Lung Opacity" in win.grid.unavailable["prior boxes"]
    assert "NIH classes only" in win.grid.toolTip()

    # View > Show panels the models cannot fill: the contrast panel appears with its reason
    win.act_unavailable.trigger()
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    assert "contrast" in win.grid.shown_order() and win.grid.panels["contrast"].isVisible()
    assert win.grid.panels["contrast"].caption == "Contrast attention dM: " + CIA_REASON
    assert win.grid.panels["contrast"].toolTip() == win.grid.panels["contrast"].caption
    win.act_unavailable.trigger()
    assert "contrast" not in win.grid.shown_order()
