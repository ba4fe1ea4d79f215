"""Pure helpers of the explanation panels: content selection, outlines, colour groups, CSV."""
from __future__ import annotations

import numpy as np

from cxrviewer.core.geometry import Box
from cxrviewer.core.render import outline, segmentation_rgba
from cxrviewer.core.results import Results
from cxrviewer.gui.export import caption_lines, findings_csv_text
from cxrviewer.gui.views.explain_panels import (SCALE_PANEL, SCALE_QUANTITY, SCALE_SHARED, best_ious, panel_content,
                                                scale_group)
from cxrviewer.gui.views.panel_grid import finite_range


def same(a, b) -> bool:
    """``a`` shows exactly ``b`` (the same memory; views of one array are new objects)."""
    return a is not None and a.shape == b.shape and np.shares_memory(a, b) and np.array_equal(a, b)


def _results() -> Results:
    rng = np.random.default_rng(0)
    cls = ("Atelectasis", "Nodule", "Mass")
    er = np.zeros((3, 50, 40), np.uint8)
    er[1:, 10:20, 10:20] = 1
    r = Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(100, 80), map_shape=(50, 40),
                classes=cls, probabilities=np.array([0.2, 0.9, 0.5], np.float32),
                maps={"cam": {"cam": rng.normal(size=(3, 50, 40)).astype(np.float32)},
                      "attention_mining": {"steps": {"Nodule": rng.random((3, 50, 40)).astype(np.float32)},
                                           "erased": {"Nodule": er}}})
    r.boxes = {"attention_mining": [Box("Nodule", 10, 10, 20, 20, 0.8)]}
    r.models = {"classifier": {"name": "msa-demo", "trained": False}}
    r.device = "cpu"
    return r


def test_panel_content_picks_the_class_maps():
    r = _results()
    ct = panel_content("original", r, 1)
    assert same(ct.heat, r.get("cam", "cam")[1]) and ct.filled and "Nodule" in ct.caption and "0.90" in ct.caption
    assert ct.proposals == ()  # proposals only when asked for (View > Show proposals)
    shown = panel_content("original", r, 1, proposals=True)
    assert [b.label for b in shown.proposals] == ["Nodule"] and shown.proposal_texts == ("Nodule map 0.80",)
    t2 = panel_content("am2", r, 1)
    assert same(t2.heat, r.get("attention_mining", "steps")["Nodule"][1]) and t2.rgba is not None
    assert panel_content("am1", r, 1).rgba is None  # nothing erased before step 1
    assert not panel_content("am1", r, 0).filled  # not mined for that class
    assert not panel_content("contrast", r, 1).filled
    assert panel_content("contrast", r, 1).caption == "Contrast attention dM: needs a CIA model with a normal bank (not loaded)"
    assert not panel_content("gradcam", None, None).filled


def test_outline_and_segmentation_overlay():
    m = np.zeros((10, 10), np.uint8)
    m[2:8, 3:7] = 1
    e = outline(m)
    assert e.sum() == 2 * 6 + 2 * 4 - 4 and not e[4, 4] and e[2, 3]
    seg = np.stack([m, np.zeros_like(m), np.zeros_like(m)])
    rgba = segmentation_rgba(seg)
    assert rgba.shape == (10, 10, 4) and rgba[4, 4, 3] == 80 and rgba[2, 3, 3] == 255 and rgba[0, 0, 3] == 0


def test_scale_groups():
    assert scale_group("original", SCALE_QUANTITY) == scale_group("am2", SCALE_QUANTITY) == "activation"
    assert scale_group("am_final", SCALE_QUANTITY) != "activation"  # H_f is normalised
    assert scale_group("gradcam", SCALE_QUANTITY) != "activation"
    assert scale_group("gradcam", SCALE_SHARED) == scale_group("contrast", SCALE_SHARED) == "all"
    assert scale_group("gradcam", SCALE_PANEL) == "gradcam"
    assert scale_group("disease_mask", SCALE_SHARED) == "probability"  # psi stays 0..1
    assert finite_range(np.array([np.nan, 1.0, 3.0])) == (1.0, 3.0)


def test_iou_labels_and_exports():
    gt = [Box("Nodule", 10, 10, 20, 20)]
    (box, v), = best_ious(gt, [Box("Nodule", 10, 10, 20, 20), Box("Nodule", 50, 50, 5, 5)])
    assert v == 1.0
    r = _results()
    text = findings_csv_text(r, "s1", {"Nodule": 1})
    lines = text.strip().splitlines()
    assert lines[0].startswith("study,rank,class,probability")
    assert lines[1].split(",")[2] == "Nodule" and lines[1].split(",")[4] == "1"
    cap = caption_lines("s1", r, 1)
    assert "Nodule" in cap[0] and "0.900" in cap[0] and "msa-demo (untrained)" in cap[1]
