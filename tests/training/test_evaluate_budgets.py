"""The evaluation's box budgets and its prior, on hand-made boxes counted by hand.

A toy explainer proposes fixed boxes on synthetic studies (no files), so every hit and every
false positive of the ChestX-ray8 protocol is known: one box per class takes the highest-scoring
box, top-3 the three best; AFP counts boxes of class c that match no GT box of c, over the images
that have a GT box of c. The prior explainer gets the fold's prior through the pipeline option.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.explain.metrics import top_boxes
from cxrviewer.core.explain.prior import OPTION, SHIPPED_TITLE
from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, register_explainer, unregister_explainer
from cxrviewer.core.geometry import Box
from cxrviewer.core.pipeline import Pipeline
from training.evaluate import evaluate_pipeline, markdown_tables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from _tiny_bundles import make_tiny_bundles, synthetic_study  # noqa: E402

H, W = 300, 260
G1 = Box("Cardiomegaly", 60, 80, 120, 100)
G2 = Box("Cardiomegaly", 70, 90, 110, 90)
GM = Box("Mass", 150, 40, 30, 30)
FAR = Box("Cardiomegaly", -80, -80, 20, 20)  # no overlap with anything in the image: a miss at every T
#: study id -> (labels, GT boxes, proposed boxes with scores)
CASES = {
    "s1": ({"Cardiomegaly": 1}, [G1],
           [Box(FAR.label, FAR.x, FAR.y, FAR.w, FAR.h, 0.9),                # the best box misses
            Box("Cardiomegaly", G1.x, G1.y, G1.w, G1.h, 0.5),       # hits, but second best
            Box("Cardiomegaly", -40, -40, 10, 10, 0.2),             # third: a miss
            Box("Cardiomegaly", G1.x + 1, G1.y, G1.w, G1.h, 0.1)]),  # fourth: hits (only in "all")
    "s2": ({"Cardiomegaly": 1, "Mass": 1}, [G2, GM],
           [Box("Cardiomegaly", G2.x, G2.y, G2.w, G2.h, 0.8),
            Box("Nodule", 10, 10, 20, 20, 0.7)]),                  # no GT Nodule anywhere: never counted
    "s3": ({}, [], [Box("Cardiomegaly", 0, 0, 50, 50, 0.9)]),      # no GT box: not an evaluated image
}


class _HandMade(Explainer):
    title = "hand-made boxes"
    proposes_boxes = True

    def compute(self, ctx):
        return ExplainerOutput({}, {})

    def propose_boxes(self, results):
        return list(CASES[results.study_id][2])


class _Ref:
    """A record the evaluation loads like a StudyRef."""

    def __init__(self, key: str) -> None:
        self.key = key

    def load(self):
        labels, gts, _ = CASES[self.key]
        study = synthetic_study(H, W, seed=int(self.key[1]))
        study.study_id, study.labels, study.gt_boxes = self.key, dict(labels), list(gts)
        return study


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    register_explainer("hand_made")(_HandMade)
    try:
        clf = make_tiny_bundles(tmp_path_factory.mktemp("m"), ("classifier",), input_size=64)["classifier"]
        yield Pipeline({"classifier": load_bundle(clf)}, "cpu", map_max_side=64, methods=["hand_made", "prior"])
    finally:
        unregister_explainer("hand_made")


REFS = [_Ref(k) for k in CASES]


def test_top_boxes_keeps_the_best_per_class():
    boxes = [Box("A", 0, 0, 1, 1, 0.1), Box("B", 0, 0, 1, 1, None), Box("A", 1, 0, 1, 1, 0.9),
             Box("A", 2, 0, 1, 1, 0.5), Box("B", 1, 0, 1, 1, 0.3)]
    assert [(b.label, b.x) for b in top_boxes(boxes, 1)] == [("A", 1), ("B", 1)]  # a scored box beats None
    assert [(b.label, b.x) for b in top_boxes(boxes, 2)] == [("A", 1), ("A", 2), ("B", 1), ("B", 0)]
    assert top_boxes(boxes, None) == boxes


def test_one_box_versus_top3_counted_by_hand(pipeline):
    res = evaluate_pipeline(pipeline, REFS, methods=["hand_made"])
    m = res["methods"]["hand_made"]
    assert res["n_boxed_images"] == 2 and res["budgets"]["top1"].startswith("one box per class")
    for metric, ths in (("iou", ("0.1", "0.3", "0.5", "0.7")), ("iobb", ("0.1", "0.5", "0.9"))):
        assert set(ths) <= set(m[metric]) and set(ths) <= set(m["top1"][metric]) and set(ths) <= set(m["top3"][metric])
        for t in ths:
            # Cardiomegaly, n = 2 (s1, s2; s3 has no GT box). One box: s1's best box misses (1 FP), s2 hits.
            assert m["top1"][metric][t]["Cardiomegaly"] == {"acc": 0.5, "afp": 0.5, "n": 2, "hits": 1, "fps": 1}
            # top-3: s1's second box hits; its first and third are false positives (2 FPs / 2 images)
            assert m["top3"][metric][t]["Cardiomegaly"] == {"acc": 1.0, "afp": 1.0, "n": 2, "hits": 2, "fps": 2}
            # every box: the fourth also hits, so still 2 FPs
            assert m[metric][t]["Cardiomegaly"] == {"acc": 1.0, "afp": 1.0, "n": 2, "hits": 2, "fps": 2}
            assert m["top1"][metric][t]["Mass"] == {"acc": 0.0, "afp": 0.0, "n": 1, "hits": 0, "fps": 0}
            # the Nodule box lies on an image without a GT Nodule: no evaluated image, nothing counted
            assert m["top3"][metric][t]["Nodule"] == {"acc": None, "afp": None, "n": 0, "hits": 0, "fps": 0}
    md = markdown_tables(res)
    assert "| hand-made boxes (`hand_made`) | 0.1 | – / – | 0.50 / 0.50 |" in md
    assert "| hand-made boxes (`hand_made`) | 0.1 | – / – | 1.00 / 1.00 |" in md


def test_the_prior_is_learned_from_the_given_training_boxes(pipeline):
    frac = {k: [b.scaled(1 / W, 1 / H) for b in CASES[k][1]] for k in CASES}
    res = evaluate_pipeline(pipeline, REFS, prior_boxes=frac, prior_title="prior (own boxes: a leak)",
                            train_boxes={k: CASES[k][1] for k in CASES})
    prior = res["methods"]["prior"]
    assert prior["title"] == "prior (own boxes: a leak)" and OPTION not in pipeline.options
    for c in ("Cardiomegaly", "Mass"):  # each image's prior is its own box: a hit at 0.7, no false positive
        assert prior["top1"]["iou"]["0.7"][c]["acc"] == 1.0 and prior["top1"]["iou"]["0.7"][c]["afp"] == 0.0
        assert res["floor_iou"]["0.7"][c]["acc"] == 1.0
    # one list for every image: the median of G1 and G2 as fractions, the same box on s1 and s2
    res = evaluate_pipeline(pipeline, REFS, prior_boxes=[b for k in ("s1", "s2") for b in frac[k]],
                            prior_title="prior (pooled)")
    hits = res["methods"]["prior"]["top1"]["iou"]["0.7"]["Cardiomegaly"]
    assert res["methods"]["prior"]["title"] == "prior (pooled)" and hits["n"] == 2 and hits["hits"] == 2
    assert set(res["methods"]["prior"]["top1"]["iou"]["0.1"]) == set(BOXED_CLASSES)
    # without training boxes the prior is the shipped one, titled as optimistic
    assert evaluate_pipeline(pipeline, REFS[:1])["methods"]["prior"]["title"] == SHIPPED_TITLE
