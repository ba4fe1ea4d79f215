"""Anatomy-guided localisation (cxrviewer/core/explain/anatomy.py) and its learning (training/localiser.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cxrviewer.core.explain.anatomy import (anatomy_boxes, anatomy_features, anatomy_shaping, cam_log_ratio,
                                            decide, from_norm, posterior_map, to_norm)
from training.localiser import Sample, fit_localiser, platt, template

H = W = 64  # mask grid; the image is 10x larger


def phantom_masks(left_shrink: int = 0) -> np.ndarray:
    """Two lungs and a heart on a 64x64 grid (channel 0 = image-right lung, as the U-Net may order them)."""
    m = np.zeros((3, H, W), np.uint8)
    m[1, 8:56 - left_shrink, 6:28] = 1  # image-left lung (its base raised by left_shrink)
    m[0, 8:56, 36:58] = 1  # image-right lung
    m[2, 34:52, 22:44] = 1  # heart
    return m


def test_anchor_boxes_follow_the_masks_whatever_the_channel_order():
    a = anatomy_boxes(phantom_masks(), (640, 640))
    assert a["L"] == pytest.approx((60, 80, 280, 560), abs=10) and a["R"] == pytest.approx((360, 80, 580, 560), abs=10)
    assert a["heart"] == pytest.approx((220, 340, 440, 520), abs=10)
    assert a["thorax"] == pytest.approx((60, 80, 580, 560), abs=10) and a["image"] == (0, 0, 640, 640)
    empty = phantom_masks()
    empty[0] = 0
    assert anatomy_boxes(empty, (640, 640)) is None  # no lung, no anchor: no boxes rather than a guess


def test_side_evidence_sees_a_smaller_lung_and_a_brighter_base():
    masks = phantom_masks(left_shrink=16)
    img = np.zeros((H, W), np.float32)
    img[40:56, 6:28] = 0.8  # opacity in the image-left lower zone
    f = anatomy_features(masks, img, anatomy_boxes(masks, (640, 640)))
    assert f[0] < -0.2 and f[1] < -0.2  # left lung area and height smaller (log left/right)
    assert f[4] > 0.3 and abs(f[2]) < 1e-6  # lower zone brighter on the left; upper zones equal
    cam = np.zeros((2, H, W), np.float32)
    cam[0, 20:40, 8:20] = 1.0
    cam[1, 20:40, 40:50] = 1.0
    r = cam_log_ratio(cam, masks)
    assert r[0] > 1.0 and r[1] < -1.0


def test_norm_round_trip_and_mirror():
    anchor = (100.0, 50.0, 300.0, 450.0)
    box = (120.0, 300.0, 200.0, 420.0)
    assert from_norm(to_norm(box, anchor), anchor) == pytest.approx(box)
    assert from_norm(to_norm(box, anchor, mirror=True), anchor, mirror=True) == pytest.approx(box)
    m = from_norm(to_norm(box, anchor), anchor, mirror=True)  # the same place in the mirrored lung
    assert m == pytest.approx((200.0, 300.0, 280.0, 420.0))


def _cls(side_w: float) -> dict:
    """A class model: symmetric thorax box worth 0.3, a lower-lung side box worth 0.6 given the side,
    the side regression on the first feature with weight ``side_w``."""
    reg = {"w": [side_w, 0, 0, 0, 0], "b": 0.0, "mean": [0] * 5, "std": [1] * 5}
    return {"sym": {"anchor": "thorax", "box": [0.1, 0.1, 0.9, 0.9], "score": 0.3},
            "side": {"box": [0.0, 0.6, 1.0, 1.0], "score": 0.6, "p_left": 0.5, "anatomy": reg}}


def test_decision_takes_the_side_only_when_the_evidence_is_strong():
    a = anatomy_boxes(phantom_masks(), (640, 640))
    box, choice, cands = decide(_cls(5.0), a, [1.0, 0, 0, 0, 0], None)  # p_left ~ 0.99
    assert choice == "side:L" and box == pytest.approx(from_norm([0.0, 0.6, 1.0, 1.0], a["L"]))
    assert decide(_cls(5.0), a, [-1.0, 0, 0, 0, 0], None)[1] == "side:R"
    assert decide(_cls(0.0), a, [1.0, 0, 0, 0, 0], None)[1] == "sym:thorax"  # p 0.5 * 0.6 = 0.3: not better
    post = posterior_map(cands, (H, W), (640, 640), anatomy_shaping(phantom_masks()))
    ys, xs = np.unravel_index(np.argmax(post), post.shape)
    assert post.max() == pytest.approx(1.0) and xs * 10 < 300 and ys * 10 > 350  # mass where the box is


def _samples(n: int, seed: int = 0) -> list[Sample]:
    """Phantom studies: Cardiomegaly = the heart box; Effusion at the base of the lung whose area is smaller."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = rng.uniform(0.8, 1.2)
        hx, hy, hw = rng.uniform(-40, 40), rng.uniform(-30, 30), rng.uniform(0.8, 1.25)  # heart size/place vary
        a = {"L": (60 * s, 80 * s, 280 * s, 560 * s), "R": (360 * s, 80 * s, 580 * s, 560 * s),
             "heart": (220 * s + hx, 340 * s + hy, 220 * s + hx + 220 * s * hw, 340 * s + hy + 180 * s * hw), "thorax": (60 * s, 80 * s, 580 * s, 560 * s),
             "image": (0.0, 0.0, 640 * s, 640 * s)}
        left = bool(i % 2)
        lung = a["L" if left else "R"]
        eff = (lung[0], lung[1] + 0.65 * (lung[3] - lung[1]), lung[2], lung[3])
        f = [(-0.3 if left else 0.3) + rng.normal(0, 0.1), *rng.normal(0, 0.1, 4)]
        out.append(Sample(f"s{i}", a, f, None, ["Cardiomegaly", "Effusion"],
                          [("Cardiomegaly", a["heart"]), ("Effusion", eff)], [0.7, 0.6],
                          {"Cardiomegaly": 1, "Effusion": 1}))
    return out


def test_fit_learns_the_heart_anchor_and_the_side_from_phantoms():
    model = fit_localiser(_samples(40), classes=("Cardiomegaly", "Effusion"))
    car, eff = model["classes"]["Cardiomegaly"], model["classes"]["Effusion"]
    assert car["sym"]["anchor"] == "heart" and car["sym"]["box"] == pytest.approx([0, 0, 1, 1], abs=0.02)
    assert eff["side"]["score"] > 0.9 and eff["side"]["score"] > eff["sym"]["score"]
    hits = 0
    for s in _samples(20, seed=1):  # unseen phantoms
        box, choice, _ = decide(eff, s.anchors, s.features, None)
        truth = s.boxes[1][1]
        ix = max(0, min(box[2], truth[2]) - max(box[0], truth[0])) * max(0, min(box[3], truth[3]) - max(box[1], truth[1]))
        union = (box[2] - box[0]) * (box[3] - box[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - ix
        hits += ix / union >= 0.5
    assert hits >= 18


def test_template_beats_the_median_when_boxes_are_bimodal():
    anchors = np.tile([0.0, 0.0, 100.0, 100.0], (20, 1))
    gts = np.array([[0, 0, 30, 30]] * 12 + [[70, 70, 100, 100]] * 8, float)
    box, score = template(anchors, np.zeros(20, bool), gts)
    assert box == pytest.approx([0, 0, 0.3, 0.3], abs=0.02) and score > 0.6


def test_heldout_score_sees_through_a_template_fitted_to_scattered_small_boxes():
    """Small boxes anywhere (nodules): the training objective rewards a template sitting on a
    cluster of training boxes, the held-out one sees that it finds nothing new; boxes in one place
    score the same either way."""
    from training.localiser import heldout_template

    rng = np.random.default_rng(0)
    anchors = np.tile([0.0, 0.0, 100.0, 100.0], (30, 1))
    xy = rng.uniform(0, 92, (30, 2))
    scattered = np.c_[xy, xy + 8]
    _, train, held = heldout_template(anchors, np.zeros(30, bool), scattered)
    assert held < 0.5 * train
    same = np.tile([20.0, 30.0, 60.0, 80.0], (30, 1))
    box, train, held = heldout_template(anchors, np.zeros(30, bool), same)
    assert held == pytest.approx(train, abs=1e-4) and box == pytest.approx([0.2, 0.3, 0.6, 0.8], abs=0.02)


def test_scattered_small_boxes_fall_back_to_the_location_prior():
    """Nodules anywhere: no anatomy template beats the median box held out, so the localiser keeps
    the prior (the ``prior`` explainer's box: median x, y, w, h in image fractions) and ``decide``
    places it in the image whatever the anatomy; the heart-anchored Cardiomegaly is not affected."""
    from cxrviewer.core.explain.anatomy import PRIOR
    from training.localiser import median_box

    rng = np.random.default_rng(3)
    samples = _samples(40)
    for s in samples:
        x0, y0 = rng.uniform(60, 560), rng.uniform(80, 520)
        s.classes.append("Nodule")
        s.boxes.append(("Nodule", (x0, y0, x0 + 30, y0 + 30)))
    model = fit_localiser(samples, classes=("Cardiomegaly", "Nodule"))
    nod = model["classes"]["Nodule"]
    assert nod["sym"]["anchor"] == PRIOR and nod["sym_scores"][PRIOR] >= max(
        nod["sym_scores"][a] for a in ("image", "thorax", "heart"))
    assert model["classes"]["Cardiomegaly"]["sym"]["anchor"] == "heart"
    img = np.array([s.anchors["image"] for s in samples])
    gts = np.array([s.boxes[-1][1] for s in samples])
    frac = np.c_[gts[:, 0] / img[:, 2], gts[:, 1] / img[:, 3], (gts[:, 2] - gts[:, 0]) / img[:, 2],
                 (gts[:, 3] - gts[:, 1]) / img[:, 3]]
    x, y, w, h = np.median(frac, axis=0)
    assert median_box(img, np.zeros(len(img), bool), gts)[0] == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    a = dict(samples[0].anchors, image=(0.0, 0.0, 500.0, 400.0))
    box, choice, _ = decide({"sym": nod["sym"]}, a, samples[0].features, None)
    assert choice == f"sym:{PRIOR}" and box == pytest.approx(from_norm(nod["sym"]["box"], a["image"]))


def test_platt_calibration_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    a, b = platt(1 / (1 + np.exp(-z)), y)
    assert a == pytest.approx(0.5, abs=0.1) and b == pytest.approx(-1.0, abs=0.15)
    assert platt(np.full(5, 0.3), np.zeros(5)) is None


def test_pipeline_runs_it_as_the_default_box_method_and_results_h5_keeps_it(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_bundles import make_tiny_bundles, synthetic_study

    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.explain.registry import ExplainerOutput
    from cxrviewer.core.explain.segmentation import SegmentationExplainer
    from cxrviewer.core.io.results import read_results, write_results
    from cxrviewer.core.panels import default_box_method
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.roles import assign_roles
    from cxrviewer.core.preprocess import resize

    def phantom_seg(self, ctx):  # the tiny U-Net finds no lungs; these masks stand in
        import torch

        m = torch.as_tensor(phantom_masks()).float()[None]
        return ExplainerOutput({"masks": (resize(m, ctx.map_shape, mode="nearest")[0].numpy() > 0.5).astype(np.uint8)},
                               {"classes": ["right_lung", "left_lung", "heart"]})

    monkeypatch.setattr(SegmentationExplainer, "compute", phantom_seg)
    bundles = assign_roles([load_bundle(p) for p in make_tiny_bundles(tmp_path).values()])
    model = fit_localiser(_samples(40), classes=("Cardiomegaly", "Effusion"))
    res = Pipeline(bundles, "cpu", map_max_side=128, options={"anatomy_model": model}).run(synthetic_study())
    boxes = res.boxes["anatomy"]
    assert [b.label for b in boxes] == ["Cardiomegaly", "Effusion"] and all(0 <= b.score <= 1 for b in boxes)
    h, w = res.image_shape
    assert all(0 <= b.x and b.x + b.w <= w + 1 and 0 <= b.y and b.y + b.h <= h + 1 for b in boxes)
    assert res.get("anatomy", "posterior").shape == (len(res.classes), *res.map_shape)
    assert res.attr("anatomy", "score_kind") == "uncalibrated" and default_box_method(res.boxes) == "anatomy"
    back = read_results(write_results(res, tmp_path / "r.h5", default_box_method="anatomy"))
    assert [(b.label, round(b.x, 2)) for b in back.boxes["anatomy"]] == [(b.label, round(b.x, 2)) for b in boxes]
    assert back.attr("anatomy", "choice") == res.attr("anatomy", "choice")
    from cxrviewer.core.explain.registry import get_explainer

    anat, k = get_explainer("anatomy"), res.classes.index("Cardiomegaly")
    back.attrs["anatomy"]["choice"]["Cardiomegaly"] = "sym:prior"  # what a prior-fallback class shows
    assert anat.caption(back, anat.panels[0], k).startswith("· box: location prior · ")
    # without a localiser model: the evidence is kept, nothing is proposed, the notice says why
    res0 = Pipeline(bundles, "cpu", map_max_side=128, options={"anatomy_model": {}}).run(synthetic_study())
    assert "anatomy" not in res0.boxes and len(res0.attr("anatomy", "features")) == 5
    assert any("no localiser model" in n for n in res0.notices) and default_box_method(res0.boxes) != "anatomy"
    # a malformed model (an unknown anchor): a notice, the other maps, no boxes, no crash
    bad = {"classes": {"Cardiomegaly": {"sym": {"anchor": "lung", "box": [0, 0, 1, 1], "score": 0.5}}}}
    res1 = Pipeline(bundles, "cpu", map_max_side=128, options={"anatomy_model": bad}).run(synthetic_study())
    assert "anatomy" not in res1.boxes and "cam" in res1.maps
    assert any("not a localiser model" in n and "evidence only" in n for n in res1.notices)


def test_a_corrupt_localiser_file_is_a_typed_error(tmp_path):
    from cxrviewer.core.errors import ExplainError
    from cxrviewer.core.explain.anatomy import check_model, load_model

    assert load_model(tmp_path / "absent.json") == {}
    p = tmp_path / "loc.json"
    p.write_text('{"classes": {"Nodule": {"sym": ', encoding="utf-8")  # cut short, as by a full disk
    with pytest.raises(ExplainError, match="cannot read the localiser model"):
        load_model(p)
    with pytest.raises(ExplainError, match="'side' needs"):
        check_model({"classes": {"Nodule": {"sym": {"anchor": "prior", "box": [0, 0, 1, 1], "score": 0.1},
                                            "side": {"box": [0, 0, 1], "score": 0.2}}}})
    good = fit_localiser(_samples(20), classes=("Cardiomegaly",))
    assert check_model(good) == good
