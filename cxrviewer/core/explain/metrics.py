"""Localisation and classification metrics.

- IoU and IoBB (baseline-cam-space-attention-gated.txt Eq. 3-4; IoBB = intersection / area of
  the *predicted* box, the ChestX-ray8 definition).
- Localisation accuracy and AFP, ChestX-ray8 style (baseline-cam Sec. 5.2; cia-net Sec. 4.1):
  for class ``c``, over the images that have a ground-truth box of ``c``, an image is correct
  when any predicted box of ``c`` overlaps any GT box of ``c`` with IoU > T(IoU) (or IoBB >
  T(IoBB)); the comparison is strict, as both papers write "IoU > T(IoU)". A predicted box of
  ``c`` that overlaps no GT box of ``c`` above T is a false positive; AFP = false positives of
  ``c`` / the number of images with a GT box of ``c`` (boxes of ``c`` on images without a GT box of
  ``c`` are not counted: those images are not evaluated for ``c``).
- Box budgets (:func:`top_boxes`): one box per class (the highest-scoring box of each class per
  image) or the top-k per class, so methods that propose many boxes are compared on equal terms.
- :func:`accuracy_until_afp`: iterative-attention-mining.txt Sec. 3.2 (ranked list B, boxes taken
  in rank order until the AFP reaches a bound).
- AUROC per class (rank statistic with average ranks for ties; NaN when a class has one label only).
- The model-free floor (:func:`floor_boxes`), reported beside every model: one fixed box per
  class, the coordinate-wise median of the training boxes, scored the same way.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.geometry import Box

__all__ = [
    "IOBB_THRESHOLDS",
    "IOU_THRESHOLDS",
    "LocResult",
    "accuracy_until_afp",
    "auroc",
    "auroc_per_class",
    "floor_boxes",
    "floor_predictions",
    "floor_table",
    "intersection",
    "iobb",
    "iou",
    "localization_accuracy",
    "localization_table",
    "top_boxes",
]

Metric = Literal["iou", "iobb"]
IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)


def intersection(a: Box, b: Box) -> float:
    """Area of the intersection of two boxes (0 when disjoint)."""
    w = min(a.x2, b.x2) - max(a.x, b.x)
    h = min(a.y2, b.y2) - max(a.y, b.y)
    return max(w, 0.0) * max(h, 0.0)


def iou(a: Box, b: Box) -> float:
    """Intersection over union (baseline-cam Eq. 3); 0 when the union is empty."""
    inter = intersection(a, b)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def iobb(pred: Box, gt: Box) -> float:
    """Intersection over the *predicted* box's area (baseline-cam Eq. 4, ChestX-ray8 IoBB)."""
    return intersection(pred, gt) / pred.area if pred.area > 0 else 0.0


def _overlap(pred: Box, gt: Box, metric: Metric) -> float:
    if metric == "iou":
        return iou(pred, gt)
    if metric == "iobb":
        return iobb(pred, gt)
    raise ValueError(f"metric must be 'iou' or 'iobb', not {metric!r}")


@dataclass(frozen=True)
class LocResult:
    """Localisation accuracy and average false positives of one class at one threshold."""

    accuracy: float
    afp: float
    n_images: int
    n_correct: int
    n_false_positives: int


def _gt_images(ground_truth: Mapping[Hashable, Sequence[Box]], label: str) -> list[Hashable]:
    return [k for k, boxes in ground_truth.items() if any(b.label == label for b in boxes)]


def localization_accuracy(
    predictions: Mapping[Hashable, Sequence[Box]],
    ground_truth: Mapping[Hashable, Sequence[Box]],
    label: str,
    threshold: float,
    metric: Metric = "iou",
) -> LocResult:
    """Accuracy and AFP of class ``label`` at ``threshold`` (ChestX-ray8 definition, see module doc).

    ``predictions`` / ``ground_truth`` map an image id to its boxes (any labels; only ``label``
    is used). Evaluated images: those with a GT box of ``label``. Accuracy is NaN when none.
    """
    images = _gt_images(ground_truth, label)
    correct = fps = 0
    for img in images:
        gts = [b for b in ground_truth[img] if b.label == label]
        preds = [b for b in predictions.get(img, ()) if b.label == label]
        hit_any = False
        for p in preds:
            if any(_overlap(p, g, metric) > threshold for g in gts):
                hit_any = True
            else:
                fps += 1
        correct += hit_any
    n = len(images)
    return LocResult(
        accuracy=correct / n if n else float("nan"),
        afp=fps / n if n else float("nan"),
        n_images=n,
        n_correct=correct,
        n_false_positives=fps,
    )


def top_boxes(boxes: Iterable[Box], k: int | None) -> list[Box]:
    """The ``k`` highest-scoring boxes of each class (all when ``k`` is None), in input order per
    class among equal scores; a box without a score ranks below every scored box of its class."""
    if k is None:
        return list(boxes)
    by_class: dict[str, list[Box]] = defaultdict(list)
    for b in boxes:
        by_class[b.label].append(b)
    return [b for bs in by_class.values()
            for b in sorted(bs, key=lambda b: (b.score is None, -(b.score or 0.0)))[:k]]


def localization_table(
    predictions: Mapping[Hashable, Sequence[Box]],
    ground_truth: Mapping[Hashable, Sequence[Box]],
    *,
    labels: Sequence[str] = BOXED_CLASSES,
    metric: Metric = "iou",
    thresholds: Sequence[float] | None = None,
) -> dict[float, dict[str, LocResult]]:
    """``{threshold: {label: LocResult}}`` for the papers' threshold grid (IoU or IoBB)."""
    if thresholds is None:
        thresholds = IOU_THRESHOLDS if metric == "iou" else IOBB_THRESHOLDS
    return {
        t: {c: localization_accuracy(predictions, ground_truth, c, t, metric) for c in labels} for t in thresholds
    }


def accuracy_until_afp(
    ranked: Mapping[Hashable, Sequence[Box]],
    ground_truth: Mapping[Hashable, Sequence[Box]],
    label: str,
    threshold: float,
    afp_bound: float,
    metric: Metric = "iou",
) -> LocResult:
    """Accuracy read along the ranked list B until the AFP would exceed ``afp_bound``.

    iterative-attention-mining.txt Sec. 3.2: ``ranked[img]`` holds an image's boxes of ``label``
    best first; B = (all images' rank-1 boxes, then all rank-2, then rank-3...), in the order of
    the ground-truth mapping; boxes are taken from B one by one while AFP <= ``afp_bound``.
    """
    images = _gt_images(ground_truth, label)
    n = len(images)
    if n == 0:
        return LocResult(float("nan"), float("nan"), 0, 0, 0)
    per_img = {img: [b for b in ranked.get(img, ()) if b.label == label] for img in images}
    depth = max((len(v) for v in per_img.values()), default=0)
    hit = dict.fromkeys(images, False)
    fps = 0
    for r in range(depth):
        for img in images:
            if r >= len(per_img[img]):
                continue
            p = per_img[img][r]
            gts = [b for b in ground_truth[img] if b.label == label]
            if any(_overlap(p, g, metric) > threshold for g in gts):
                hit[img] = True
            else:
                if (fps + 1) / n > afp_bound:
                    break
                fps += 1
        else:
            continue
        break
    correct = sum(hit.values())
    return LocResult(correct / n, fps / n, n, correct, fps)


# ---- AUROC ---------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0  # ties share the mean rank
        i = j + 1
    return ranks


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2); NaN with one label only."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each column of ``scores [N, C]`` against ``labels [N, C]`` (NaN where undefined)."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"need scores and labels [N, C] of one shape; got {s.shape} and {y.shape}")
    return np.array([auroc(s[:, c], y[:, c]) for c in range(s.shape[1])], dtype=np.float64)


# ---- the floor -----------------------------------------------------------------------
def floor_boxes(training_boxes: Iterable[Box]) -> dict[str, Box]:
    """One fixed box per class: the coordinate-wise median (x, y, w, h) of its training boxes."""
    groups: dict[str, list[Box]] = defaultdict(list)
    for b in training_boxes:
        groups[b.label].append(b)
    out = {}
    for label, bs in groups.items():
        a = np.array([[b.x, b.y, b.w, b.h] for b in bs], dtype=np.float64)
        x, y, w, h = np.median(a, axis=0)
        out[label] = Box(label, float(x), float(y), float(w), float(h), 1.0)
    return out


def floor_predictions(
    floor: Mapping[str, Box], images: Iterable[Hashable]
) -> dict[Hashable, list[Box]]:
    """Every image gets the same one box per class (the floor's "prediction")."""
    boxes = list(floor.values())
    return {img: list(boxes) for img in images}


def floor_table(
    training_boxes: Iterable[Box],
    ground_truth: Mapping[Hashable, Sequence[Box]],
    *,
    labels: Sequence[str] = BOXED_CLASSES,
    metric: Metric = "iou",
    thresholds: Sequence[float] | None = None,
) -> dict[float, dict[str, LocResult]]:
    """The floor scored exactly like a method: :func:`localization_table` of the median boxes."""
    preds = floor_predictions(floor_boxes(training_boxes), ground_truth.keys())
    return localization_table(preds, ground_truth, labels=labels, metric=metric, thresholds=thresholds)
