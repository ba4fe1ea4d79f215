"""ROC, precision-recall and reliability (calibration) curves of probabilities against 0/1 labels.

Plain numpy, no plotting: ``cxr-train evaluate`` writes them as data and PNG
(:mod:`cxrviewer.core.plots`), the model card carries them thinned (:func:`thin`) and the GUI's
model card dialog draws them. The area under :func:`roc_curve` (trapezoids over distinct
thresholds) equals the Mann-Whitney AUROC of :func:`cxrviewer.core.explain.metrics.auroc`, ties
counted 1/2; :func:`pr_curve`'s average precision is the step sum ``sum (R_k - R_k-1) P_k``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["N_BINS", "curves_json", "pr_curve", "reliability", "roc_curve", "thin", "thin_curves"]

#: equal-width probability bins of the reliability diagram
N_BINS = 10


def _prepare(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    """Scores sorted descending, and per distinct score the cumulative (true, false) positives."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} and {y.size}")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
    tp = np.cumsum(y)[last] if s.size else np.zeros(0)
    fp = (last + 1) - tp
    return s[last], tp.astype(np.float64), fp.astype(np.float64), int(y.sum()), int((~y).sum())


def roc_curve(scores: Sequence[float] | np.ndarray,
              labels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(fpr, tpr, thresholds, auc)``: one point per distinct score (predict positive at
    ``score >= threshold``), starting at (0, 0) with threshold +inf; NaN rates and AUC when the
    labels hold one class only."""
    thr, tp, fp, n_pos, n_neg = _prepare(scores, labels)
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.full(thr.size + 1, np.nan)
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.full(thr.size + 1, np.nan)
    auc = float(np.trapezoid(tpr, fpr)) if n_pos and n_neg else float("nan")
    return fpr, tpr, np.r_[np.inf, thr], auc


def pr_curve(scores: Sequence[float] | np.ndarray,
             labels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(recall, precision, thresholds, average_precision)``: one point per distinct score,
    starting at recall 0 with precision 1; NaN without a positive label."""
    thr, tp, fp, n_pos, _ = _prepare(scores, labels)
    if not n_pos:
        nan = np.full(thr.size + 1, np.nan)
        return nan, nan.copy(), np.r_[np.inf, thr], float("nan")
    recall = np.r_[0.0, tp / n_pos]
    precision = np.r_[1.0, tp / np.maximum(tp + fp, 1)]
    ap = float(np.sum(np.diff(recall) * precision[1:]))
    return recall, precision, np.r_[np.inf, thr], ap


def reliability(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
                n_bins: int = N_BINS) -> dict[str, Any]:
    """Reliability diagram of ``n_bins`` equal-width bins of [0, 1]: per bin the mean predicted
    probability, the fraction of positive labels and the count (empty bins: None), and the expected
    calibration error ``ece = sum_b n_b / N |fraction_b - mean_b|``."""
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    y = (np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5).astype(np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} and {y.size}")
    idx = np.minimum((s * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(idx, s, n_bins) / count
        frac = np.bincount(idx, y, n_bins) / count
    ece = float(np.nansum(count / max(s.size, 1) * np.abs(frac - mean))) if s.size else float("nan")
    return {"bin_edges": [i / n_bins for i in range(n_bins + 1)], "mean_predicted": _list(mean),
            "fraction_positive": _list(frac), "count": [int(c) for c in count], "ece": _num(ece)}


def _num(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def _list(a: np.ndarray) -> list[float | None]:
    return [_num(v) for v in a]


def curves_json(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], n_bins: int = N_BINS) -> dict:
    """Every curve of ``probs [N, C]`` against ``labels [N, C]`` as JSON-able lists::

        {"roc": {class: {"fpr", "tpr", "threshold", "auc", "n_pos", "n_neg"}},
         "pr": {class: {"recall", "precision", "threshold", "ap", "prevalence"}},
         "calibration": {"all": reliability of every (study, class) pair, class: reliability}}

    thresholds start with None (= +inf); a class with one label value only has null rates.
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels) > 0.5
    if p.ndim != 2 or p.shape != y.shape or p.shape[1] != len(classes):
        raise ValueError(f"need probs and labels [N, {len(classes)}]; got {p.shape} and {y.shape}")
    out: dict[str, Any] = {"roc": {}, "pr": {}, "calibration": {"all": reliability(p.ravel(), y.ravel(), n_bins)}}
    for j, c in enumerate(classes):
        fpr, tpr, thr, auc = roc_curve(p[:, j], y[:, j])
        n_pos = int(y[:, j].sum())
        out["roc"][c] = {"fpr": _list(fpr), "tpr": _list(tpr), "threshold": _list(thr), "auc": _num(auc),
                         "n_pos": n_pos, "n_neg": int(y.shape[0] - n_pos)}
        rec, prec, thr, ap = pr_curve(p[:, j], y[:, j])
        out["pr"][c] = {"recall": _list(rec), "precision": _list(prec), "threshold": _list(thr), "ap": _num(ap),
                        "prevalence": _num(n_pos / y.shape[0]) if y.shape[0] else None}
        out["calibration"][c] = reliability(p[:, j], y[:, j], n_bins)
    return out


def thin(xs: Sequence[Any], ys: Sequence[Any], max_points: int) -> tuple[list, list]:
    """At most ``max_points`` points of a curve, evenly spaced by index, first and last kept."""
    n = len(xs)
    if n <= max_points or max_points < 2:
        return list(xs), list(ys)
    keep = sorted(set(np.linspace(0, n - 1, max_points).round().astype(int).tolist()))
    return [xs[i] for i in keep], [ys[i] for i in keep]


def thin_curves(curves: Mapping[str, Any], max_points: int = 101) -> dict[str, Any]:
    """:func:`curves_json` output with each ROC and PR curve thinned to ``max_points`` points and
    the thresholds dropped (what metrics.json and the model card carry); the areas stay exact."""
    out: dict[str, Any] = {"roc": {}, "pr": {}, "calibration": dict(curves.get("calibration") or {})}
    for c, r in (curves.get("roc") or {}).items():
        fpr, tpr = thin(r["fpr"], r["tpr"], max_points)
        out["roc"][c] = {**{k: v for k, v in r.items() if k not in ("fpr", "tpr", "threshold")}, "fpr": fpr, "tpr": tpr}
    for c, r in (curves.get("pr") or {}).items():
        rec, prec = thin(r["recall"], r["precision"], max_points)
        out["pr"][c] = {**{k: v for k, v in r.items() if k not in ("recall", "precision", "threshold")},
                        "recall": rec, "precision": prec}
    return out
