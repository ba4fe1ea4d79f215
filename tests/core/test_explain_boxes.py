"""Heat map -> boxes (ChestX-ray8 threshold, AM three ranked boxes, CIA grid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.explain.boxes import box_to_grid, grid_to_boxes, heatmap_to_boxes, ranked_boxes
from cxrviewer.core.geometry import Box


def _two_blobs() -> np.ndarray:
    h = np.zeros((8, 8))
    h[1:3, 1:4] = 10.0  # strong, 2 rows x 3 cols
    h[5:8, 6:8] = 6.0  # weaker, 3 x 2
    return h


def test_components_to_boxes_scaled_to_image() -> None:
    boxes = heatmap_to_boxes(_two_blobs(), 0.5, label="Mass", image_size=(80, 160))
    assert len(boxes) == 2
    a, b = boxes
    assert (a.label, a.x, a.y, a.w, a.h) == ("Mass", 20.0, 10.0, 60.0, 20.0)
    assert a.score == pytest.approx(10.0)  # mean raw heat inside
    assert (b.x, b.y, b.w, b.h) == (120.0, 50.0, 40.0, 30.0)
    # normalisation is for extraction only: the weaker blob (0.6) drops at 0.7
    assert len(heatmap_to_boxes(_two_blobs(), 0.7)) == 1
    assert heatmap_to_boxes(np.zeros((4, 4))) == []
    assert len(heatmap_to_boxes(torch.from_numpy(_two_blobs())[None], 0.5)) == 2


def test_ranked_boxes_three_thresholds_ranked_by_mean_heat() -> None:
    h = np.zeros((10, 10))
    h[2:5, 2:5] = 4.0
    h[3, 3] = 10.0  # peak inside the first blob
    h[7:9, 7:9] = 3.0
    boxes = ranked_boxes(h, (0.75, 0.5, 0.25), label="Nodule")
    assert len(boxes) == 3
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    assert (boxes[0].x, boxes[0].y, boxes[0].w, boxes[0].h) == (3, 3, 1, 1)  # the peak, threshold 0.75
    assert {(b.x, b.y, b.w, b.h) for b in boxes[1:]} == {(2, 2, 3, 3), (7, 7, 2, 2)}
    # a single flat blob gives one box only ("fewer than 3 bboxes")
    flat = np.zeros((5, 5))
    flat[1:3, 1:3] = 1
    assert len(ranked_boxes(flat)) == 1


def test_grid_to_boxes_and_box_to_grid_roundtrip() -> None:
    g = np.zeros((16, 16))
    g[4:8, 2:5] = 0.9
    g[12, 12] = 0.5  # exactly 0.5 is not positive
    boxes = grid_to_boxes(g, label="Effusion", image_size=(512, 512))
    assert len(boxes) == 1
    b = boxes[0]
    assert (b.x, b.y, b.w, b.h) == (64.0, 128.0, 96.0, 128.0)
    assert b.score == pytest.approx(0.9)
    back = box_to_grid(b, (512, 512), (16, 16))
    assert np.array_equal(back > 0, g > 0.5)
    # a box touching a cell by any positive area marks it
    small = box_to_grid(Box("Nodule", 31.0, 31.0, 2.0, 2.0), (512, 512))
    assert small.sum() == 4 and small[0, 0] == 1 and small[1, 1] == 1
    assert box_to_grid(Box("Nodule", 600, 600, 5, 5), (512, 512)).sum() == 0
