"""What ``cxr-train evaluate`` writes beside its tables: curves (data and PNG) and per-study predictions.

Files in the output folder (:func:`write_outputs`):

* ``curves.json``: every point of the ROC and precision-recall curve of each class and the
  reliability diagram (:func:`cxrviewer.core.curves.curves_json`); ``roc.csv`` (class, threshold,
  fpr, tpr), ``pr.csv`` (class, threshold, recall, precision), ``calibration.csv`` (class or
  ``all``, bin, bin_low, bin_high, mean_predicted, fraction_positive, count): the same points.
* ``roc.png``, ``pr.png``: one chart per class (AUROC / average precision in its title; the
  chance diagonal, the prevalence line); ``calibration.png``: the reliability diagram of every
  (study, class) pair, with the diagonal of perfect calibration and the ECE.
* ``predictions.csv``: one row per study and class: ``study, class, probability, label`` (the
  numbers the AUROC table is computed from; probabilities written exactly), ``method`` (the box
  method), ``box_x, box_y, box_w, box_h, box_score`` (that method's highest-scoring box of the
  class on the study, original pixels: the box the one-box-per-class tables score; empty without
  one), ``iou`` (that box against the best-matching official box of the class; empty without
  either) and ``n_gt_boxes`` (official boxes of the class on the study).

Drawn with Pillow (:mod:`cxrviewer.core.plots`); no matplotlib.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cxrviewer.core.explain.metrics import iou
from cxrviewer.core.geometry import Box
from cxrviewer.core.plots import Series, chart_grid, line_chart, save_png

__all__ = ["PREDICTION_FIELDS", "calibration_image", "pr_image", "prediction_rows", "read_predictions",
           "roc_image", "write_outputs"]

#: the columns of predictions.csv
PREDICTION_FIELDS = ("study", "class", "probability", "label", "method", "box_x", "box_y", "box_w", "box_h",
                     "box_score", "iou", "n_gt_boxes")
#: one chart of a per-class grid (pixels), and its columns
CHART_SIZE, GRID_COLS = (330, 300), 4


def _best(boxes: Sequence[Box], label: str) -> Box | None:
    """The highest-scoring box of ``label`` (the first among equal scores; unscored boxes last)."""
    mine = [b for b in boxes if b.label == label]
    return min(mine, key=lambda b: (b.score is None, -(b.score or 0.0))) if mine else None


def prediction_rows(keys: Sequence[str], probs: Sequence[Sequence[float]], labels: Sequence[Sequence[float]],
                    classes: Sequence[str], names: Sequence[str], method: str,
                    boxes: Mapping[str, Sequence[Box]], gts: Mapping[str, Sequence[Box]]) -> list[dict[str, Any]]:
    """The rows of predictions.csv (see the module docstring): per study ``keys[i]`` and class
    ``classes[j]`` (whose boxes are labelled ``names[j]``, e.g. its NIH name) the probability and
    label, ``method``'s best box of the class in ``boxes[key]`` and its best IoU with ``gts[key]``."""
    rows = []
    for key, p, y in zip(keys, probs, labels):
        for j, c in enumerate(classes):
            box = _best(boxes.get(key, ()), names[j])
            gt = [g for g in gts.get(key, ()) if g.label == names[j]]
            row: dict[str, Any] = {"study": key, "class": c, "probability": float(p[j]), "label": int(y[j] > 0.5),
                                   "method": method, "n_gt_boxes": len(gt)}
            if box is not None:
                row.update(box_x=box.x, box_y=box.y, box_w=box.w, box_h=box.h, box_score=box.score)
                if gt:
                    row["iou"] = max(iou(box, g) for g in gt)
            rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[_cell(v) for v in r] for r in rows])
    return buf.getvalue()


def _write_utf8(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (the project's :func:`~cxrviewer.core.annotations.export.atomic_write`)."""
    from cxrviewer.core.annotations.export import atomic_write

    atomic_write(path, text.encode("utf-8"))


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """predictions.csv back as rows (numbers as float/int, empty cells as None)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = dict(r)
            for k in ("probability", "box_x", "box_y", "box_w", "box_h", "box_score", "iou"):
                row[k] = float(r[k]) if r.get(k) else None
            row["label"], row["n_gt_boxes"] = int(r["label"]), int(r["n_gt_boxes"])
            out.append(row)
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def roc_image(curves: Mapping[str, Any], title: str = "") -> Image.Image:
    """One ROC chart per class (AUROC and positives in its title, the chance diagonal)."""
    charts = []
    for c, r in curves["roc"].items():
        charts.append(line_chart([Series(f"AUROC {_fmt(r.get('auc'))}", r["fpr"], r["tpr"])],
                                 title=f"{c} ({r.get('n_pos', '?')} of {r.get('n_pos', 0) + r.get('n_neg', 0)} "
                                       "positive)", xlabel="False positive rate", ylabel="True positive rate",
                                 reference=((0, 0), (1, 1)), reference_name="chance", size=CHART_SIZE, font_size=12))
    return chart_grid(charts, GRID_COLS, title=title or "ROC curve per class")


def pr_image(curves: Mapping[str, Any], title: str = "") -> Image.Image:
    """One precision-recall chart per class (average precision in its legend, prevalence as the
    chance line)."""
    charts = []
    for c, r in curves["pr"].items():
        prev = r.get("prevalence")
        ref = ((0, prev), (1, prev)) if prev is not None else None
        charts.append(line_chart([Series(f"AP {_fmt(r.get('ap'))}", r["recall"], r["precision"], steps=True)], title=c,
                                 xlabel="Recall", ylabel="Precision", reference=ref,
                                 reference_name=f"prevalence {_fmt(prev)}", size=CHART_SIZE, font_size=12,
                                 legend="upper right"))
    return chart_grid(charts, GRID_COLS, title=title or "Precision-recall curve per class")


def calibration_image(curves: Mapping[str, Any], title: str = "") -> Image.Image:
    """The reliability diagram of every (study, class) pair, with the diagonal and the ECE, above
    the histogram of the predictions per bin."""
    rel = curves["calibration"]["all"]
    n = sum(rel["count"])
    diagram = line_chart([Series(f"all classes (ECE {_fmt(rel.get('ece'))})", rel["mean_predicted"],
                                 rel["fraction_positive"], markers=True)],
                         title=title or f"Reliability diagram: {n} (study, class) predictions in "
                                        f"{len(rel['count'])} bins", xlabel="Mean predicted probability",
                         ylabel="Fraction positive", reference=((0, 0), (1, 1)),
                         reference_name="perfectly calibrated", size=(560, 460), legend="upper left", min_left=64)
    edges, counts = rel["bin_edges"], rel["count"]
    xs = [edges[0]] + [e for i, c in enumerate(counts) for e in (edges[i], edges[i + 1])] + [edges[-1]]
    ys = [0] + [c for c in counts for _ in (0, 1)] + [0]
    hist = line_chart([Series("predictions per bin", xs, ys, color=(127, 127, 127))], xlabel="Predicted probability",
                      ylabel="Predictions", ylim=(0, max(max(counts, default=0) * 1.1, 1)), size=(560, 200),
                      legend="upper right", min_left=64)
    return chart_grid([diagram, hist], 1)


def _curve_csvs(curves: Mapping[str, Any]) -> dict[str, str]:
    roc = [[c, t, x, y] for c, r in curves["roc"].items() for t, x, y in zip(r["threshold"], r["fpr"], r["tpr"])]
    pr = [[c, t, x, y] for c, r in curves["pr"].items()
          for t, x, y in zip(r["threshold"], r["recall"], r["precision"])]
    cal = [[c, i, r["bin_edges"][i], r["bin_edges"][i + 1], m, f, n]
           for c, r in curves["calibration"].items()
           for i, (m, f, n) in enumerate(zip(r["mean_predicted"], r["fraction_positive"], r["count"]))]
    return {"roc.csv": _csv_text(("class", "threshold", "fpr", "tpr"), roc),
            "pr.csv": _csv_text(("class", "threshold", "recall", "precision"), pr),
            "calibration.csv": _csv_text(("class", "bin", "bin_low", "bin_high", "mean_predicted",
                                          "fraction_positive", "count"), cal)}


def write_outputs(curves: Mapping[str, Any] | None, predictions: Sequence[Mapping[str, Any]] | None,
                  out_dir: str | Path, *, title: str = "") -> list[str]:
    """Write the curve data and PNGs (when ``curves``) and predictions.csv (when ``predictions``)
    into ``out_dir`` (each file atomically); returns the file names written. ``curves.json`` keeps
    infinite thresholds as null (the first point of every curve)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if predictions:
        _write_utf8(out / "predictions.csv", _csv_text(PREDICTION_FIELDS, [[r.get(k) for k in PREDICTION_FIELDS]
                                                                           for r in predictions]))
        written.append("predictions.csv")
    if curves and curves.get("roc"):
        _write_utf8(out / "curves.json", json.dumps(curves) + "\n")
        written.append("curves.json")
        for name, text in _curve_csvs(curves).items():
            _write_utf8(out / name, text)
            written.append(name)
        suffix = f": {title}" if title else ""
        for name, draw, what in (("roc.png", roc_image, "ROC curve per class"),
                                 ("pr.png", pr_image, "Precision-recall curve per class"),
                                 ("calibration.png", calibration_image, "")):
            save_png(draw(curves, f"{what}{suffix}" if what else ""), out / name)
            written.append(name)
    return written
