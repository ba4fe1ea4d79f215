"""IoU/IoBB, ChestX-ray8 localisation accuracy + AFP, AM's AFP-bounded accuracy, AUROC, the floor."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxrviewer.core.explain.metrics import (
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    accuracy_until_afp,
    auroc,
    auroc_per_class,
    floor_boxes,
    floor_table,
    iobb,
    iou,
    localization_accuracy,
    localization_table,
)
from cxrviewer.core.geometry import Box


def test_iou_and_iobb_by_hand() -> None:
    a = Box("Mass", 0, 0, 10, 10)
    b = Box("Mass", 5, 0, 10, 10)
    assert iou(a, b) == pytest.approx(50 / 150)
    small = Box("Mass", 2, 2, 2, 2)
    assert iou(small, a) == pytest.approx(4 / 100)
    assert iobb(small, a) == pytest.approx(1.0)  # / predicted box area
    assert iobb(a, small) == pytest.approx(0.04)
    assert iou(a, Box("Mass", 20, 20, 5, 5)) == 0.0
    assert iobb(Box("Mass", 0, 0, 0, 0), a) == 0.0


def test_threshold_grids_match_the_papers() -> None:
    assert IOU_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    assert IOBB_THRESHOLDS == (0.1, 0.25, 0.5, 0.75, 0.9)


def _gt() -> dict[str, list[Box]]:
    return {
        "i1": [Box("Mass", 0, 0, 10, 10), Box("Nodule", 50, 50, 4, 4)],
        "i2": [Box("Mass", 20, 20, 10, 10)],
        "i3": [Box("Effusion", 0, 0, 5, 5)],
    }


def test_localization_accuracy_any_box_hits_any_gt_and_afp() -> None:
    preds = {
        "i1": [Box("Mass", 0, 0, 10, 10, 0.9), Box("Mass", 80, 80, 5, 5, 0.2)],  # 1 hit, 1 FP
        "i2": [Box("Mass", 25, 20, 10, 10, 0.8)],  # IoU 50/150 = 0.333
        "i3": [Box("Mass", 0, 0, 5, 5, 0.9)],  # image without Mass GT: not evaluated for Mass
    }
    r = localization_accuracy(preds, _gt(), "Mass", 0.3)
    assert (r.n_images, r.n_correct, r.n_false_positives) == (2, 2, 1)
    assert r.accuracy == 1.0 and r.afp == 0.5
    r5 = localization_accuracy(preds, _gt(), "Mass", 0.5)
    assert r5.accuracy == 0.5 and r5.afp == 1.0  # i2's box now a false positive
    # strict ">": IoU exactly at the threshold does not count
    assert localization_accuracy(preds, _gt(), "Mass", 50 / 150).accuracy == 0.5
    assert math.isnan(localization_accuracy(preds, _gt(), "Hernia", 0.1).accuracy)
    # IoBB: a small box inside the GT is correct at every IoBB threshold
    inner = {"i1": [Box("Nodule", 51, 51, 1, 1)]}
    assert localization_accuracy(inner, _gt(), "Nodule", 0.9, "iobb").accuracy == 1.0
    assert localization_accuracy(inner, _gt(), "Nodule", 0.1, "iou").accuracy == 0.0
    table = localization_table(preds, _gt(), labels=("Mass",))
    assert list(table) == list(IOU_THRESHOLDS)
    assert table[0.3]["Mass"].accuracy == 1.0


def test_accuracy_until_afp_reads_the_ranked_list() -> None:
    gt = {"a": [Box("Mass", 0, 0, 10, 10)], "b": [Box("Mass", 0, 0, 10, 10)]}
    miss = Box("Mass", 50, 50, 5, 5, 0.9)
    hit = Box("Mass", 0, 0, 10, 10, 0.5)
    ranked = {"a": [miss, hit], "b": [miss, hit]}
    # bound 1.0: both rank-1 misses (AFP 1.0), then both rank-2 hits
    r = accuracy_until_afp(ranked, gt, "Mass", 0.5, afp_bound=1.0)
    assert (r.accuracy, r.afp) == (1.0, 1.0)
    # bound 0.5: the second miss would push AFP to 1.0 -> stop before rank 2
    r = accuracy_until_afp(ranked, gt, "Mass", 0.5, afp_bound=0.5)
    assert (r.accuracy, r.afp, r.n_false_positives) == (0.0, 0.5, 1)


def test_auroc_by_hand_with_ties_and_nan() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)  # ties count 1/2
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    s = np.array([[0.1, 0.2], [0.9, 0.3], [0.4, 0.1]])
    y = np.array([[0, 0], [1, 0], [0, 0]])
    out = auroc_per_class(s, y)
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1])


def test_auroc_matches_pairwise_definition_on_random_data() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    pos, neg = s[y == 1], s[y == 0]
    ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(ref)


def test_floor_is_median_box_scored_the_same_way() -> None:
    train = [Box("Cardiomegaly", x, 40, 30, 20) for x in (10, 12, 14)] + [Box("Mass", 0, 0, 4, 4)]
    fl = floor_boxes(train)
    assert (fl["Cardiomegaly"].x, fl["Cardiomegaly"].y, fl["Cardiomegaly"].w) == (12.0, 40.0, 30.0)
    gt = {"t1": [Box("Cardiomegaly", 12, 40, 30, 20)], "t2": [Box("Cardiomegaly", 60, 0, 30, 20)]}
    table = floor_table(train, gt, labels=("Cardiomegaly",), thresholds=(0.3,))
    assert table[0.3]["Cardiomegaly"].accuracy == 0.5
    assert table[0.3]["Cardiomegaly"].afp == 0.5


def test_floor_on_the_nih_boxes(nih_dir) -> None:
    """METHODS.md: a constant box localises Cardiomegaly at T(IoU)=0.3 almost always (5 folds)."""
    import csv
    import gzip
    from collections import defaultdict

    from cxrviewer.core.classes import canonical

    by_image: dict[str, list[Box]] = defaultdict(list)
    with gzip.open(nih_dir / "BBox_List_2017.csv.gz", "rt", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    for r in rows:
        by_image[r[0]].append(Box(canonical(r[1]), *map(float, r[2:6])))
    ids = sorted(by_image)
    assert len(ids) > 800
    card, nod = [], []
    for fold in range(5):
        test = {i: by_image[i] for k, i in enumerate(ids) if k % 5 == fold}
        train = [b for k, i in enumerate(ids) if k % 5 != fold for b in by_image[i]]
        t = floor_table(train, test, labels=("Cardiomegaly", "Nodule"), thresholds=(0.3,))
        card.append(t[0.3]["Cardiomegaly"].accuracy)
        nod.append(t[0.3]["Nodule"].accuracy)
    assert np.mean(card) > 0.9  # measured 0.99
    assert np.mean(nod) < 0.05  # measured 0.00: a fixed box cannot find nodules
