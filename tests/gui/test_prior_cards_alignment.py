"""The location prior as a grey reference box, the rejected-alignment flag, model cards in the
Models panel and "below the location prior" in panel titles (offscreen Qt, tiny bundles, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QGraphicsItem, QGraphicsRectItem

from cxrviewer.core.bundle import read_manifest
from cxrviewer.core.model_card import BELOW_PRIOR, card_lines, write_model_card
from cxrviewer.core.results import Results
from cxrviewer.gui import settings
from cxrviewer.gui.views.layers import PriorLayer
from cxrviewer.gui.widgets.status_flags import REJECTED_STYLE
from tests.core._tiny_bundles import make_tiny_bundles
from tests.gui.test_explain_window import make_win, open_and_analyse, studies  # noqa: F401 - fixtures

BELOW = "Cardiomegaly"  # in the card's below_prior, and a class the shipped prior has a box for
CARD = {"data": "NIH ChestX-ray14 (test)", "mean_auroc": 0.61, "auroc": {BELOW: 0.7},
        "localisation": {"t_iou": 0.3, "method": "cam",
                         "per_class": {BELOW: {"method": 0.05, "prior": 0.4, "n": 7},
                                       "Effusion": {"method": 0.5, "prior": 0.2, "n": 5}}}}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny model set, the classifier carrying a model card (overrides make_win's folder)."""
    d = tmp_path_factory.mktemp("tiny-carded")
    paths = make_tiny_bundles(d, input_size=128)
    write_model_card(paths["classifier"], CARD)
    return d


def _select(win, name: str) -> int:
    c = win.results.classes.index(name)
    win.select_class(c)
    win.grid.flush()
    return c


def test_prior_toggle_draws_grey_reference_boxes_never_editable_or_saved(qtbot, make_win, studies):
    win = make_win()
    assert not win.act_prior.isChecked() and win.act_prior.shortcut().toString() == "Shift+P"
    open_and_analyse(qtbot, win, studies[:1])
    _select(win, BELOW)
    panel = win.grid.original
    assert panel.prior.items == []  # off by default
    win.act_prior.trigger()
    win.grid.flush()
    assert settings.show_prior() is True
    assert [b.label for b in panel.prior.boxes] == [BELOW] and isinstance(panel.prior, PriorLayer)
    rect = next(i for i in panel.prior.items if isinstance(i, QGraphicsRectItem))
    assert rect.pen().style() == Qt.PenStyle.DashLine and rect.pen().color() == QColor(190, 190, 190)
    assert any(getattr(i, "textItem", None) is not None and i.textItem.toPlainText() == f"prior · {BELOW}"
               for i in panel.prior.items)
    for item in panel.prior.items:
        assert item.acceptedMouseButtons() == Qt.MouseButton.NoButton
        assert not item.flags() & (QGraphicsItem.GraphicsItemFlag.ItemIsSelectable
                                   | QGraphicsItem.GraphicsItemFlag.ItemIsMovable)
    assert win.grid.panels["gradcam"].prior.boxes and not win.grid.panels["aligned"].prior.boxes
    assert all(b.label != BELOW or b.score is not None for b in panel.proposals.boxes)  # not a proposal
    ann = win.annotations
    ann.set_annotation_mode(True)  # annotation mode: the model's boxes become proposals, the prior never
    ann.on_results(win.state.study.pixel_sha256(), win.results)
    pb = panel.prior.boxes[0]
    assert ann.editor.items and all((it.x, it.y, it.w, it.h) != (pb.x, pb.y, pb.w, pb.h)
                                      for it in ann.editor.items)
    assert [it for it in ann.editor.items if it.kind == "box"] == []  # nothing saved as an annotation
    ann.set_annotation_mode(False)
    win.act_prior.trigger()
    win.grid.flush()
    assert panel.prior.items == [] and settings.show_prior() is False


def test_below_prior_in_panel_titles_and_card_dialog(qtbot, make_win, studies, tiny_models):
    win = make_win()
    open_and_analyse(qtbot, win, studies[:1])
    _select(win, BELOW)
    cam = win.grid.panels["original"]
    assert cam.caption.endswith(f"· {BELOW_PRIOR}") and BELOW_PRIOR in cam._title.text
    assert BELOW_PRIOR in win.grid.panels["gradcam"].caption
    assert BELOW_PRIOR not in win.grid.panels["aligned"].caption  # an image, not a map of the class
    for key in ("original", "gradcam"):  # wrapped to the panel, not clipped
        p = win.grid.panels[key]
        assert p._title.item.boundingRect().width() <= p.width()
    _select(win, "Effusion")
    assert BELOW_PRIOR not in cam.caption and "Effusion" in cam.caption

    picker = win.model_picker
    row = next(i for i, b in enumerate(picker.bundles) if b.path.name == "classifier.cxrbundle")
    dlg = picker.show_card(row)
    assert dlg is not None and dlg.isVisible() and dlg.text.isReadOnly()
    assert dlg.lines == card_lines(read_manifest(picker.bundles[row].path))
    assert any(BELOW in line and BELOW_PRIOR in line for line in dlg.lines)
    other = next(i for i, b in enumerate(picker.bundles) if i != row)
    picker.tree.itemDoubleClicked.emit(picker.tree.topLevelItem(other), 0)
    assert picker.card_dialog is not dlg and picker.card_dialog.lines[0].startswith("No model card")
    picker.card_dialog.close()


def _results(study, quality: float, rejected: bool) -> Results:
    return Results(study_id=study.study_id, source_path="x", pixel_sha256=study.pixel_sha256(),
                   image_shape=study.shape, map_shape=(32, 32), classes=("Nodule",),
                   probabilities=np.array([0.5], np.float32),
                   attrs={"alignment": {"quality": quality, "min_quality": 0.7, "rejected": rejected}})


def test_status_bar_flags_a_rejected_alignment_for_that_study_only(qtbot, make_win, studies, tmp_path):
    win = make_win(models_dir=tmp_path / "none")
    win.open_paths([str(p) for p in studies[:2]])
    qtbot.waitUntil(lambda: win.state.study is not None, timeout=30_000)
    study = win.state.study
    flag = win.align_flag
    assert not flag.isVisible()
    win.inference.finished.emit(study.pixel_sha256(), _results(study, 0.55, True), "memory")
    assert flag.isVisible() and flag.rejected and flag.styleSheet() == REJECTED_STYLE
    assert flag.text() == "Alignment rejected (NCC 0.55 < 0.70): maps on the unaligned image"
    assert "Alignment rejected (NCC 0.55" in win.log_panel.toPlainText()
    win.inference.finished.emit(study.pixel_sha256(), _results(study, 0.91, False), "memory")
    assert flag.isVisible() and not flag.rejected and flag.text() == "Aligned, NCC 0.91"
    win.inference.finished.emit(study.pixel_sha256(), _results(study, 0.4, True), "memory")
    assert flag.rejected
    win.state.step(1)
    qtbot.waitUntil(lambda: win.state.study is not None and win.state.study is not study, timeout=30_000)
    assert not flag.isVisible() and not flag.rejected and flag.text() == ""
