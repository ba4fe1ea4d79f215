"""ROC / PR / reliability curves (cxrviewer/core/curves.py) and the Pillow charts (cxrviewer/core/plots.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrviewer.core.curves import curves_json, pr_curve, reliability, roc_curve, thin, thin_curves
from cxrviewer.core.explain.metrics import auroc
from cxrviewer.core.plots import PALETTE, Series, chart_grid, line_chart, save_png, ticks


def _pairwise_auroc(s, y):
    """AUROC by counting every (positive, negative) pair, ties 1/2 (independent of both implementations)."""
    pos, neg = s[y > 0.5], s[y <= 0.5]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def test_roc_area_is_the_mann_whitney_auroc_with_ties():
    rng = np.random.default_rng(0)
    s = rng.random(200).round(1)  # many ties
    y = (rng.random(200) < s).astype(float)
    fpr, tpr, thr, auc = roc_curve(s, y)
    assert abs(auc - _pairwise_auroc(s, y)) < 1e-12 and abs(auc - auroc(s, y)) < 1e-12
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.isinf(thr[0])
    assert len(fpr) == len(np.unique(s)) + 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.isnan(roc_curve(s, np.zeros(200))[3])


def test_pr_curve_and_average_precision_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 0, 1, 0])
    rec, prec, thr, ap = pr_curve(s, y)
    assert rec.tolist() == [0, 0.5, 0.5, 1, 1] and prec.tolist() == [1, 1, 0.5, 2 / 3, 0.5]
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert np.isnan(pr_curve(s, np.zeros(4))[3])


def test_reliability_bins_and_ece():
    s = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    y = np.array([0, 1, 1, 1, 0])
    r = reliability(s, y, n_bins=10)
    assert r["count"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert r["fraction_positive"][0] == 0.5 and r["mean_predicted"][9] == pytest.approx(0.95)
    assert r["mean_predicted"][1] is None  # an empty bin
    want = (2 * 0.45 + 1 * 0.55 + 2 * 0.05) / 5
    assert r["ece"] == pytest.approx(want)


def test_curves_json_and_thinning_keep_the_areas():
    rng = np.random.default_rng(1)
    p = rng.random((300, 3))
    y = (rng.random((300, 3)) < p).astype(float)
    y[:, 2] = 0  # a class without positives: null rates, null area
    c = curves_json(p, y, ["a", "b", "c"])
    assert c["roc"]["a"]["auc"] == pytest.approx(auroc(p[:, 0], y[:, 0]), abs=1e-12)
    assert c["roc"]["c"]["auc"] is None and c["pr"]["c"]["ap"] is None and c["roc"]["c"]["n_pos"] == 0
    assert sum(c["calibration"]["all"]["count"]) == 900 and c["roc"]["a"]["threshold"][0] is None
    t = thin_curves(c, 50)
    assert len(t["roc"]["a"]["fpr"]) == 50 and t["roc"]["a"]["auc"] == c["roc"]["a"]["auc"]
    assert t["roc"]["a"]["fpr"][0] == 0 and t["roc"]["a"]["tpr"][-1] == 1 and "threshold" not in t["roc"]["a"]
    assert thin([1, 2, 3], [4, 5, 6], 10) == ([1, 2, 3], [4, 5, 6])
    with pytest.raises(ValueError):
        curves_json(p, y[:, :2], ["a", "b", "c"])


def test_ticks_are_round_and_cover_the_range():
    assert ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert ticks(0.5, 0.5) == [0.5]


def _pixels(img, colour, box=None):
    a = np.asarray(img.crop(box) if box else img).astype(int)
    return int((np.abs(a - np.array(colour)).sum(-1) < 60).sum())


def _dark(img, box=None):
    """Pixels of text, frame and ticks (near-black, anti-aliased)."""
    return int((np.asarray(img.crop(box) if box else img).astype(int).max(-1) < 110).sum())


def test_line_chart_draws_the_series_axes_legend_and_reference(tmp_path):
    red = (214, 39, 40)
    img = line_chart([Series("model", [0, 0.2, 1], [0, 0.8, 1], color=red)], title="ROC", xlabel="FPR",
                     ylabel="TPR", reference=((0, 0), (1, 1)), reference_name="chance", size=(320, 300))
    assert img.size == (320, 300) and img.mode == "RGB"
    assert _pixels(img, red) > 200  # the curve
    assert _pixels(img, (150, 150, 150)) > 50  # the dashed diagonal
    dark = _dark(img)
    assert dark > 600  # frame, ticks and text
    bare = line_chart([Series("", [0, 1], [0, 1], color=red)], size=(320, 300), legend="")
    assert _dark(bare) < dark - 50  # no title, axis titles or legend text
    # the left strip holds the rotated y title and the tick labels; the bottom strip the x title
    assert _dark(img, (0, 60, 18, 240)) > 20 and _dark(img, (100, 282, 220, 300)) > 20
    steps = line_chart([Series("s", [0, 0.5, 1], [1, 0.5, 0.2], color=red, steps=True)], size=(200, 200))
    assert _pixels(steps, red) > 100
    path = save_png(chart_grid([img, img, img], 2, title="three charts"), tmp_path / "g.png")
    with Image.open(path) as g:
        assert g.size[0] == 640 and g.size[1] > 600
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left
    assert len(PALETTE) >= 14


def test_missing_values_break_the_line():
    red = (214, 39, 40)
    whole = line_chart([Series("", [0, 0.5, 1], [0, 0.5, 1], color=red)], size=(200, 200), legend="")
    broken = line_chart([Series("", [0, 0.5, None, 1], [0, 0.5, None, 1], color=red)], size=(200, 200), legend="")
    assert 0 < _pixels(broken, red) < _pixels(whole, red)
    with pytest.raises(ValueError):
        chart_grid([], 2)


def _plot_left(img):
    """The x of the plot frame's left edge: the first column that is dark over most of the height."""
    a = np.asarray(img).astype(int).max(-1) < 110
    return int(np.argmax(a.sum(0) > img.height * 0.5))


def test_min_left_lines_up_stacked_charts_and_rows_keep_their_heights():
    tall = line_chart([Series("", [0, 1], [0, 1])], ylabel="Fraction", size=(300, 300), legend="", min_left=70)
    wide_ticks = line_chart([Series("", [0, 1], [0, 1000])], ylabel="Count", ylim=(0, 1000), size=(300, 120),
                            legend="", min_left=70)
    assert abs(_plot_left(tall) - _plot_left(wide_ticks)) <= 1 and _plot_left(tall) >= 69
    stacked = chart_grid([tall, wide_ticks], 1)
    assert stacked.size == (300, 420)
