"""Evaluation tables laid out like the papers' tables.

Classifier-family bundles: AUROC per class, and localisation accuracy (with
AFP) at T(IoU) in {0.1..0.7} and T(IoBB) in {0.1, 0.25, 0.5, 0.75, 0.9} for
the eight boxed classes, with boxes from the CAM (ChestX-ray8 threshold), from
the attention-mining final map (three ranked boxes) or from Grad-CAM; the
model-free floor (median training box per class) scored the same way beside
it (METHODS.md "Always report the floor"). CIA bundles: boxes from the grid
of positive cells. Everything is computed in the model's input space; IoU and
IoBB are invariant to the per-axis scaling back to original pixels.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES
from cxrviewer.core.explain.metrics import (IOBB_THRESHOLDS, IOU_THRESHOLDS, LocResult, floor_table,
                                            localization_table)
from cxrviewer.core.geometry import Box

log = logging.getLogger(__name__)

METHODS = ("cam", "am", "gradcam", "cia")


def _boxes_of(arr: torch.Tensor) -> list[Box]:
    return [Box(CLASSES[int(r[0])], float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in arr.tolist()]


def predict_boxes(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], method: str = "cam",
                  *, negative: torch.Tensor | None = None) -> tuple[np.ndarray, list[Box]]:
    """Probabilities [C] and proposed boxes (input-pixel space) of one image [1, S, S].

    ``classes``: indices whose boxes are wanted (the boxed classes of the image).
    ``negative``: the paired normal image for CIA models.
    """
    from cxrviewer.core.explain.attention_mining import attention_mining
    from cxrviewer.core.explain.boxes import CHESTXRAY8_THRESHOLD, grid_to_boxes, heatmap_to_boxes, ranked_boxes
    from cxrviewer.core.explain.gradcam import grad_cam

    size = (int(image.shape[-2]), int(image.shape[-1]))
    x = image.unsqueeze(0) if image.dim() == 3 else image
    boxes: list[Box] = []
    if method == "cia":
        if negative is None:
            raise ValueError("CIA evaluation needs the paired normal image")
        neg = negative.unsqueeze(0) if negative.dim() == 3 else negative
        with torch.no_grad():
            out = model(x, neg)
        probs = out["image_probs"][0].float().cpu().numpy() if "image_probs" in out else \
            (1 - torch.prod(1 - out["grid_probs"][0].flatten(1).float(), dim=1)).cpu().numpy()
        for c in classes:
            boxes += grid_to_boxes(out["grid_probs"][0, c], 0.5, label=CLASSES[c], image_size=size)[:3]
        return probs, boxes
    with torch.no_grad():
        out = model(x)
    probs = torch.sigmoid(out["logits"][0].float()).cpu().numpy()
    for c in classes:
        if method == "cam":
            boxes += heatmap_to_boxes(out["cam"][0, c], CHESTXRAY8_THRESHOLD, label=CLASSES[c], image_size=size)[:3]
        elif method == "am":
            w, _ = model.cam_weights()
            res = attention_mining(out["features"], w, c)
            boxes += ranked_boxes(res.final[0], label=CLASSES[c], image_size=size)
        elif method == "gradcam":
            g = grad_cam(model, x, model.feature_layer(), c)
            boxes += heatmap_to_boxes(g[0] if g.dim() == 3 else g, CHESTXRAY8_THRESHOLD, label=CLASSES[c],
                                      image_size=size)[:3]
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return probs, boxes


def evaluate_model(model: torch.nn.Module, dataset, *, method: str = "cam", train_boxes: Sequence[Box] = (),
                   negatives=None) -> dict:
    """AUROC per class on all of ``dataset`` and localisation tables on its boxed images.

    ``dataset`` items follow :mod:`training.data.dataset` (image, labels, boxes in input pixels);
    ``train_boxes`` (input pixels) give the floor; ``negatives(i) -> image`` pairs a normal for CIA.
    """
    from cxrviewer.core.explain.metrics import auroc_per_class

    model.eval()
    probs, labels = [], []
    preds: dict[int, list[Box]] = {}
    gts: dict[int, list[Box]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        gt = _boxes_of(item["boxes"])
        cls = sorted({CLASSES.index(b.label) for b in gt if b.label in BOXED_CLASSES})
        neg = negatives(i) if negatives is not None else None
        p, b = predict_boxes(model, item["image"], cls, method, negative=neg)
        probs.append(p)
        labels.append(item["labels"].numpy())
        if gt:
            preds[i], gts[i] = b, gt
    probs_a, labels_a = np.stack(probs), np.stack(labels)
    au = auroc_per_class(probs_a, labels_a)
    result = {
        "method": method,
        "n_images": len(dataset),
        "n_boxed_images": len(gts),
        "auroc": {c: _num(v) for c, v in zip(CLASSES, au)},
        "mean_auroc": _num(np.nanmean(au)) if np.isfinite(au).any() else None,
        "iou": _table_json(localization_table(preds, gts, metric="iou")),
        "iobb": _table_json(localization_table(preds, gts, metric="iobb")),
    }
    if train_boxes:
        result["floor_iou"] = _table_json(floor_table(train_boxes, gts, metric="iou"))
        result["floor_iobb"] = _table_json(floor_table(train_boxes, gts, metric="iobb"))
    return result


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _table_json(table: Mapping[float, Mapping[str, LocResult]]) -> dict:
    return {f"{t:g}": {c: {"acc": _num(r.accuracy), "afp": _num(r.afp), "n": r.n_images}
                       for c, r in row.items()} for t, row in table.items()}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown_tables(result: Mapping, *, title: str = "") -> str:
    """The papers' layout: one row per threshold, one column per boxed class, then the mean."""
    lines = [f"## {title}".rstrip(), ""] if title else []
    short = [c.replace("_", " ") for c in BOXED_CLASSES]
    for key, name, ths in (("iou", "T(IoU)", IOU_THRESHOLDS), ("iobb", "T(IoBB)", IOBB_THRESHOLDS)):
        for prefix, label in (("", result.get("method", "")), ("floor_", "floor (median box)")):
            tab = result.get(prefix + key)
            if not tab:
                continue
            lines.append(f"Localisation accuracy, {label}, {name} (n boxed images per class in the last row)")
            lines.append("")
            lines.append("| " + " | ".join([name] + short + ["Mean"]) + " |")
            lines.append("|" + "---|" * (len(short) + 2))
            for t in ths:
                row = tab[f"{t:g}"]
                accs = [row[c]["acc"] for c in BOXED_CLASSES]
                vals = [a for a in accs if a is not None]
                mean = sum(vals) / len(vals) if vals else None
                lines.append("| " + " | ".join([f"{t:g}"] + [_fmt(a) for a in accs] + [_fmt(mean)]) + " |")
            n_row = tab[f"{ths[0]:g}"]
            lines.append("| n | " + " | ".join(str(n_row[c]["n"]) for c in BOXED_CLASSES) + " | |")
            lines.append("")
    if "auroc" in result:
        lines.append("AUROC per class")
        lines.append("")
        lines.append("| " + " | ".join([c.replace("_", " ") for c in CLASSES] + ["Mean"]) + " |")
        lines.append("|" + "---|" * (len(CLASSES) + 1))
        lines.append("| " + " | ".join([_fmt(result["auroc"][c]) for c in CLASSES]
                                       + [_fmt(result.get("mean_auroc"))]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(result: Mapping, out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``metrics.json`` and ``tables.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "metrics.json", out / "tables.md"
    j.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m.write_text(markdown_tables(result, title=title) + "\n", encoding="utf-8")
    return j, m
