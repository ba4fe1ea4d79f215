"""Learn the anatomy-guided localiser (cxrviewer/core/explain/anatomy.py) from boxed training images.

The evidence of every study comes from the app's own pipeline (the ``anatomy`` explainer's
attributes: anchor boxes, side features, CAM log-ratios), so what is learned is what the app
computes. Per class (:func:`fit_localiser`):

* a template per anchor (image, thorax, heart): coordinate-descent search, from the coordinate-wise
  median and every training box, for the box (as anchor fractions) with the most training hits
  averaged over T(IoU) 0.1/0.3/0.5/0.7 plus a quarter of the mean IoU (ties -> the median); its
  score, which picks the anchor and is weighed against the side template's at run time, is that
  objective held out (inner 5-fold: :func:`heldout_template`), not the training value;
* the location prior as a fourth candidate (:func:`median_box`: the coordinate-wise median
  (x, y, w, h) of the boxes in image fractions, the ``prior`` explainer's box): it is kept unless an
  anatomy template beats its held-out objective, so a class whose
  boxes the anatomy cannot place (nodules anywhere) falls back to the floor instead of a template
  that only fits the training boxes;
* a side template relative to the lung on the box's own side, left and right pooled by mirroring,
  and two L2-regularised logistic regressions p(image-left | evidence): anatomy only, and anatomy
  plus the CAM term (when the studies had a classifier);
* the prevalence of the class and, given held-out probabilities, Platt calibration.
"""
from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.explain.anatomy import ANCHORS, FEATURES, PRIOR, to_norm

__all__ = ["THRESHOLDS", "Sample", "collect_evidence", "fit_localiser", "heldout_template",
           "logistic", "median_box", "platt", "sample_from_results", "template"]

#: the T(IoU) values a template is fitted for (the evaluation's thresholds)
THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
#: fewer boxes of a class than this: no side model (p_left alone would be noise)
MIN_SIDE_BOXES = 8
#: L2 strength of the side regressions on standardised features (1 / C)
SIDE_L2 = 3.0
#: inner folds of the held-out template scores that choose the anchor and the side rule
INNER_FOLDS = 5

Quad = tuple[float, float, float, float]


@dataclass
class Sample:
    """One study's evidence (the anatomy explainer's attributes) and its ground truth."""

    key: str
    anchors: dict[str, Quad]
    features: list[float]
    cam_log_ratio: list[float] | None
    classes: list[str]
    boxes: list[tuple[str, Quad]] = field(default_factory=list)  # (class, (x0, y0, x1, y1)) pixels
    probabilities: list[float] | None = None
    labels: dict[str, int] = field(default_factory=dict)


def sample_from_results(key: str, results: Any, study: Any) -> Sample | None:
    """A :class:`Sample` from a pipeline run (None when the anatomy explainer produced nothing)."""
    ev = results.attrs.get("anatomy") or {}
    if not ev.get("anchors"):
        return None
    return Sample(key, {k: tuple(v) for k, v in ev["anchors"].items()}, list(ev["features"]),
                  None if ev.get("cam_log_ratio") is None else list(ev["cam_log_ratio"]), list(results.classes),
                  [(b.label, (b.x, b.y, b.x + b.w, b.y + b.h)) for b in study.gt_boxes],
                  None if results.probabilities is None else [float(v) for v in results.probabilities],
                  dict(study.labels or {}))


def collect_evidence(pipeline_for: Callable[[Any], Any], refs: Sequence[Any],
                     progress: Callable[[int, int, str], None] | None = None) -> list[Sample]:
    """Run ``pipeline_for(ref)`` (the pipeline that may see this study: e.g. its held-out fold's
    models) on every reference and keep the evidence; a study that fails is skipped."""
    from cxrviewer.core.errors import CxrError

    out = []
    for i, ref in enumerate(refs):
        try:
            study = ref.load()
            s = sample_from_results(str(ref.key), pipeline_for(ref).run(study), study)
        except CxrError:
            s = None
        if s is not None:
            out.append(s)
        if progress is not None:
            progress(i + 1, len(refs), str(ref.key))
    return out


def _from_norm_all(n: np.ndarray, a: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    nn = np.where(mirror[:, None], np.array([1 - n[2], n[1], 1 - n[0], n[3]])[None], n[None])
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    return np.c_[a[:, 0] + nn[:, 0] * w, a[:, 1] + nn[:, 1] * h, a[:, 0] + nn[:, 2] * w, a[:, 1] + nn[:, 3] * h]


def _iou(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    iy = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = ix * iy
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def _objective(n: np.ndarray, a: np.ndarray, mirror: np.ndarray, g: np.ndarray) -> float:
    v = _iou(_from_norm_all(n, a, mirror), g)
    return float(np.mean([(v >= t).mean() for t in THRESHOLDS]) + 0.25 * v.mean())


def _norms(anchors: np.ndarray, mirror: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """The boxes ``gts`` as fractions of their anchors ``[N, 4]`` (:func:`to_norm`)."""
    return np.array([to_norm(tuple(g), tuple(a), mirror=bool(m)) for a, m, g in zip(anchors, mirror, gts)])


def template(anchors: np.ndarray, mirror: np.ndarray, gts: np.ndarray) -> tuple[list[float], float]:
    """The box (anchor fractions) with the best training objective (module docstring) and that
    objective. ``anchors``/``gts`` ``[N, 4]`` (x0, y0, x1, y1) pixels, ``mirror`` bool ``[N]``."""
    norms = _norms(anchors, mirror, gts)
    best = np.median(norms, axis=0)
    score = _objective(best, anchors, mirror, gts)
    for n in norms:
        s = _objective(n, anchors, mirror, gts)
        if s > score + 1e-9:
            best, score = n.copy(), s
    for step in (0.08, 0.04, 0.02, 0.01):
        improved = True
        while improved:
            improved = False
            for i in range(4):
                for d in (-step, step):
                    n = best.copy()
                    n[i] += d
                    if n[2] - n[0] < 0.02 or n[3] - n[1] < 0.02:
                        continue
                    s = _objective(n, anchors, mirror, gts)
                    if s > score + 1e-9:
                        best, score, improved = n, s, True
    return [round(float(v), 5) for v in best], round(score, 5)


def logistic(x: np.ndarray, y: np.ndarray, l2: float = SIDE_L2) -> dict[str, Any]:
    """L2-regularised logistic regression on standardised ``x`` (Newton steps): ``{w, b, mean, std}``."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / std, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = np.r_[np.full(z.shape[1] - 1, l2), 1e-6]
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"w": [round(float(v), 6) for v in w[:-1]], "b": round(float(w[-1]), 6),
            "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def platt(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float] | None:
    """Platt scaling ``sigmoid(a * logit(p) + b)`` fitted on held-out probabilities (None: one label only)."""
    if labels.min() == labels.max():
        return None
    logit = np.log(np.clip(probs, 1e-6, 1 - 1e-6) / np.clip(1 - probs, 1e-6, 1))
    reg = logistic(logit[:, None], labels.astype(float), l2=1e-3)
    a = reg["w"][0] / reg["std"][0]
    return round(a, 6), round(reg["b"] - a * reg["mean"][0], 6)


def _side(anchors: Mapping[str, Quad], box: Quad) -> str:
    """Which lung a box belongs to: image-left (``L``) or image-right (``R``) of the midline."""
    mid = (anchors["L"][2] + anchors["R"][0]) / 2.0
    return "L" if (box[0] + box[2]) / 2.0 < mid else "R"


def median_box(anchors: np.ndarray, mirror: np.ndarray, gts: np.ndarray) -> tuple[list[float], float]:
    """The location prior as anchor fractions ``(x0, y0, x1, y1)``: the coordinate-wise median
    ``(x, y, w, h)`` of the boxes (cxrviewer/core/explain/metrics.py ``floor_boxes``; with the image as
    the anchor it is the ``prior`` explainer's box), and its training objective."""
    norms = _norms(anchors, mirror, gts)
    x, y = np.median(norms[:, 0]), np.median(norms[:, 1])
    w, h = np.median(norms[:, 2] - norms[:, 0]), np.median(norms[:, 3] - norms[:, 1])
    box = np.array([x, y, x + w, y + h])
    return [round(float(v), 5) for v in box], round(_objective(box, anchors, mirror, gts), 5)


def heldout_template(anchors: np.ndarray, mirror: np.ndarray, gts: np.ndarray, folds: int = INNER_FOLDS,
                     seed: int = 0, fit: Callable[..., tuple[list[float], float]] = template,
                     ) -> tuple[list[float], float, float]:
    """``fit`` (:func:`template`, or :func:`median_box`) on all boxes, its training objective and its
    held-out objective: the mean, over ``folds`` inner folds of the boxes (leave-one-out below
    ``folds`` boxes), of the objective on each fold of the box fitted without it. The held-out value
    is what a template scores on a new patient; the training one favours templates fitted to few or
    scattered boxes."""
    box, train = fit(anchors, mirror, gts)
    n = len(gts)
    parts = np.array_split(np.random.default_rng(seed).permutation(n), min(folds, n))
    total = 0.0
    for part in parts:
        rest = np.setdiff1d(np.arange(n), part)
        fitted, _ = fit(anchors[rest], mirror[rest], gts[rest])
        total += len(part) * _objective(np.asarray(fitted), anchors[part], mirror[part], gts[part])
    return box, train, round(total / n, 5)


def _fit_class(ex: list[tuple[Sample, Quad]], index: int) -> dict[str, Any]:
    gts = np.array([b for _, b in ex], float)
    flat = np.zeros(len(ex), bool)
    syms = {a: heldout_template(np.array([s.anchors[a] for s, _ in ex], float), flat, gts) for a in ANCHORS}
    syms[PRIOR] = heldout_template(np.array([s.anchors["image"] for s, _ in ex], float), flat, gts, fit=median_box)
    anchor = max(ANCHORS, key=lambda a: (syms[a][2], a == "image"))
    if syms[PRIOR][2] >= syms[anchor][2]:  # the anatomy does not beat the floor: keep it
        anchor = PRIOR
    out: dict[str, Any] = {"n": len(ex), "sym": {"anchor": anchor, "box": syms[anchor][0], "score": syms[anchor][2],
                                                 "train_score": syms[anchor][1]},
                           "sym_scores": {a: syms[a][2] for a in (*ANCHORS, PRIOR)}, "side": None}
    if len(ex) < MIN_SIDE_BOXES:
        return out
    sides = [_side(s.anchors, b) for s, b in ex]
    box, train, score = heldout_template(np.array([s.anchors[k] for (s, _), k in zip(ex, sides)], float),
                                         np.array([k == "R" for k in sides]), gts)
    y = np.array([k == "L" for k in sides], float)
    side: dict[str, Any] = {"box": box, "score": score, "train_score": train, "p_left": round(float(y.mean()), 5)}
    if 0 < y.sum() < len(y):
        x = np.array([s.features for s, _ in ex], float)
        side["anatomy"] = logistic(x, y)
        if all(s.cam_log_ratio is not None for s, _ in ex):
            side["with_cam"] = logistic(np.c_[x, [s.cam_log_ratio[index] for s, _ in ex]], y)
    out["side"] = side
    return out


def fit_localiser(samples: Sequence[Sample], *, classes: Sequence[str] = BOXED_CLASSES,
                  calibration: Sequence[Sample] | None = None, classifier_sha256: str | None = None,
                  provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The localiser model (the layout :mod:`cxrviewer.core.explain.anatomy` reads) learned from
    ``samples``; ``calibration``: studies with held-out probabilities and labels for Platt scaling
    of the classifier whose weights have ``classifier_sha256``."""
    model: dict[str, Any] = {"what": "anatomy-guided localiser (cxrviewer/core/explain/anatomy.py)", "format": 1,
                             "features": list(FEATURES), "thresholds": list(THRESHOLDS), "classes": {}}
    all_labels = [s for s in samples if s.labels]
    for c in classes:
        ex = [(s, b) for s in samples for label, b in s.boxes if label == c]
        if len(ex) < 3:
            continue
        index = samples[0].classes.index(c) if c in samples[0].classes else -1
        model["classes"][c] = _fit_class(ex, index)
        if all_labels:
            model["classes"][c]["prevalence"] = round(float(np.mean([s.labels.get(c, 0) > 0 for s in all_labels])), 5)
    model["calibration"] = _calibration(calibration, classifier_sha256)
    model["provenance"] = {"n_studies": len(samples), "n_boxes": sum(len(s.boxes) for s in samples),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           **dict(provenance or {})}
    return model


def _calibration(samples: Sequence[Sample] | None, sha: str | None) -> dict[str, Any] | None:
    """Platt parameters per class from studies with probabilities and labels (None: none given)."""
    rows = [s for s in samples or () if s.probabilities is not None and s.labels]
    if not rows or not sha:
        return None
    classes = rows[0].classes
    probs = np.array([s.probabilities for s in rows], float)
    a, b = {}, {}
    for i, c in enumerate(classes):
        fit = platt(probs[:, i], np.array([s.labels.get(c, 0) > 0 for s in rows], float))
        if fit is not None and math.isfinite(fit[0]) and math.isfinite(fit[1]):
            a[c], b[c] = fit
    return {"classifier_sha256": sha, "a": a, "b": b, "n": len(rows), "how": "Platt scaling on held-out studies"}
