"""Evaluation tables laid out like the papers' tables.

:func:`evaluate_pipeline` scores the app's own pipeline (:class:`cxrviewer.core.pipeline.Pipeline`,
the one behind the viewer and ``cxrviewer analyze``): each study is loaded as the app loads it,
run through the same preprocessing, alignment, crop and map resolution, and every explainer
that proposes boxes (:mod:`cxrviewer.core.explain.registry`: a ``box_rule``, or ``proposes_boxes``)
is scored on the boxes it proposed, in ORIGINAL pixels, against the ground-truth boxes. A newly
registered method with a ``box_rule`` is scored without touching this file. The ``prior``
explainer (cxrviewer/core/explain/prior.py, the fixed median box the app ships or the bundle
carries) is one of them; an explainer's ``title`` attribute of the run names its row, so the
shipped prior, computed from ALL official NIH boxes, reads "prior (shipped, all NIH boxes:
optimistic on NIH)": on NIH folds the floor below (the fold's own training boxes) is the honest
reference. AUROC per class comes from the pipeline's probabilities;
localisation accuracy and AFP at T(IoU) 0.1..0.7 and T(IoBB) 0.1/0.25/0.5/0.75/0.9
(baseline-cam-space-attention-gated.txt Sec. 5.2) for the eight boxed classes, with the
model-free floor (median training box per class, METHODS.md "Always report the floor") beside
every method.

:func:`evaluate_model` scores a bare network on a training dataset in its input space (for the
trainers and the benchmarks, whose models are not bundles yet); its boxes come from the same
registry box rules through the single-model API (:meth:`Explainer.explain`), and Grad-CAM from
:mod:`cxrviewer.core.explain.gradcam` on one forward.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES
from cxrviewer.core.errors import CxrError
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.gradcam import GradCamExplainer, capture_activation, gradcam_from_activation
from cxrviewer.core.explain.metrics import (IOBB_THRESHOLDS, IOU_THRESHOLDS, LocResult, auroc_per_class,
                                            floor_boxes, localization_table)
from cxrviewer.core.geometry import Box

if TYPE_CHECKING:
    from cxrviewer.core.explain.registry import Explainer
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.study import Study

log = logging.getLogger(__name__)

__all__ = ["evaluate_model", "evaluate_pipeline", "markdown_tables", "scored_explainers", "single_model_boxes",
           "write_report"]

#: Short method names :func:`evaluate_model` also accepts (``cia`` is what training/trainers/cia.py passes).
SHORT_NAMES = {"am": "attention_mining", "cia": "contrast"}
#: Training boxes for the floor: one list for every test image, or a list per record key
#: (e.g. the boxes of the other folds when every image is a test image).
TrainBoxes = Sequence[Box] | Mapping[str, Sequence[Box]]


# ---- the app's pipeline -----------------------------------------------------------------------
def scored_explainers(pipeline: "Pipeline", methods: Sequence[str] | None = None) -> list["Explainer"]:
    """The pipeline's explainers that propose boxes (``proposes_boxes``), optionally only ``methods``.

    Raises ``ValueError`` naming a requested method that is unknown, has no box rule or does not
    run with the loaded bundles.
    """
    boxed = [e for e in pipeline.explainers if e.proposes_boxes]
    if methods is None:
        return boxed
    by_name = {e.name: e for e in boxed}
    for m in methods:
        if m not in by_name:
            ex = get_explainer(m)  # unknown names raise here
            why = ("proposes no boxes" if not ex.proposes_boxes
                   else f"needs the role(s) {', '.join(ex.requires)}; loaded: {', '.join(pipeline.bundles)}")
            raise ValueError(f"method '{m}' cannot be scored: it {why}")
    return [by_name[m] for m in dict.fromkeys(methods)]


def _load(record: Any) -> "Study":
    """A study as the app loads it: a :class:`~cxrviewer.core.io.StudyRef` (labels and boxes
    attached, boxes scaled to the image), or a :class:`training.data.Record` (boxes taken as
    original pixels)."""
    if hasattr(record, "load"):
        return record.load()
    from cxrviewer.core.io import load_study

    study = load_study(record.path)
    study.labels = {c: int(v > 0) for c, v in zip(CLASSES, np.asarray(record.labels))}
    study.gt_boxes = list(record.boxes)
    return study


def _labels(study: "Study", classes: Sequence[str]) -> np.ndarray:
    have = study.labels or {}
    return np.array([float(have.get(c, 0) > 0) for c in classes], dtype=np.float32)


def evaluate_pipeline(pipeline: "Pipeline", records: Sequence[Any], *, train_boxes: TrainBoxes = (),
                      methods: Sequence[str] | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> dict:
    """AUROC and localisation tables of ``pipeline`` on ``records`` (see the module docstring).

    ``records``: :class:`~cxrviewer.core.io.StudyRef` s (or training records) with labels and
    ground-truth boxes. ``train_boxes`` (original pixels) give the floor (see :data:`TrainBoxes`).
    ``methods``: explainer names to score (default: every one with a box rule the pipeline runs).
    ``progress(i, n, key)`` is called after each study. A study that cannot be loaded or analysed
    is listed under ``failed`` and left out.
    """
    scorers = scored_explainers(pipeline, methods)
    classes = tuple(pipeline.classes)
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    preds: dict[str, dict[str, list[Box]]] = {e.name: {} for e in scorers}
    titles = {e.name: e.title for e in scorers}
    gts: dict[str, list[Box]] = {}
    failed: list[dict[str, str]] = []
    for i, rec in enumerate(records):
        key = str(getattr(rec, "key", i))
        try:
            study = _load(rec)
            res = pipeline.run(study)
        except CxrError as exc:
            log.warning("%s: %s", key, exc)
            failed.append({"key": key, "error": str(exc)})
        else:
            if res.probabilities is not None:
                classes = tuple(res.classes)
                probs.append(np.asarray(res.probabilities, np.float64))
                labels.append(_labels(study, classes))
            if study.gt_boxes:
                gts[key] = list(study.gt_boxes)
                for e in scorers:
                    preds[e.name][key] = list(res.boxes.get(e.name, []))
                    titles[e.name] = str(res.attr(e.name, "title", titles[e.name]))
        if progress is not None:
            progress(i + 1, len(records), key)
    out: dict[str, Any] = {"n_images": len(records) - len(failed), "n_boxed_images": len(gts),
                           "classes": list(classes), "boxed_classes": list(BOXED_CLASSES),
                           **_auroc_json(probs, labels, classes),
                           "methods": {e.name: {"title": titles[e.name], **_loc_json(preds[e.name], gts)}
                                       for e in scorers},
                           "frame": "original pixels"}
    out.update(_floor_json(train_boxes, gts))
    if failed:
        out["failed"] = failed
    return out


def _auroc_json(probs: list[np.ndarray], labels: list[np.ndarray], classes: Sequence[str]) -> dict:
    if not probs or len(probs[0]) != len(classes):
        return {"auroc": None, "mean_auroc": None}
    au = auroc_per_class(np.stack(probs), np.stack(labels))
    return {"auroc": {c: _num(v) for c, v in zip(classes, au)},
            "mean_auroc": _num(np.nanmean(au)) if np.isfinite(au).any() else None}


def _loc_json(preds: Mapping[str, Sequence[Box]], gts: Mapping[str, Sequence[Box]]) -> dict:
    return {"iou": _table_json(localization_table(preds, gts, metric="iou")),
            "iobb": _table_json(localization_table(preds, gts, metric="iobb"))}


def _floor_json(train_boxes: TrainBoxes, gts: Mapping[str, Sequence[Box]]) -> dict:
    """``floor_iou`` / ``floor_iobb``: the median training box of each class placed on every
    boxed test image (per image from its own training boxes when ``train_boxes`` is a mapping)."""
    if not train_boxes:
        return {}
    if isinstance(train_boxes, Mapping):
        medians: dict[int, list[Box]] = {}
        preds = {}
        for k in gts:
            tb = train_boxes.get(k, ())
            if id(tb) not in medians:
                medians[id(tb)] = list(floor_boxes(tb).values())
            preds[k] = medians[id(tb)]
    else:
        one = list(floor_boxes(train_boxes).values())
        preds = {k: one for k in gts}
    loc = _loc_json(preds, gts)
    return {"floor_iou": loc["iou"], "floor_iobb": loc["iobb"]}


# ---- a bare network on a training dataset (input space) ---------------------------------------
def _boxes_of(arr: torch.Tensor) -> list[Box]:
    return [Box(CLASSES[int(r[0])], float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in arr.tolist()]


def _probabilities(out: Mapping[str, torch.Tensor]) -> np.ndarray:
    if "logits" in out:
        return torch.sigmoid(out["logits"][0].detach().float()).cpu().numpy()
    if "image_probs" in out:
        return out["image_probs"][0].detach().float().cpu().numpy()
    grid = out["grid_probs"][0].detach().flatten(1).float()  # cia-net Eq. 4: P(class) = 1 - prod(1 - p_ij)
    return (1 - torch.prod(1 - grid, dim=1)).cpu().numpy()


def single_model_boxes(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], method: str = "cam",
                       *, negative: torch.Tensor | None = None, steps: int | None = None
                       ) -> tuple[np.ndarray, list[Box]]:
    """Probabilities ``[C]`` and the boxes (input pixels) of explainer ``method`` for ``classes``
    on one image ``[1, S, S]``, from ONE forward of ``model``.

    Boxes come from the explainer's ``box_map`` through its ``box_rule``; ``negative`` is the
    paired normal image of a CIA network; ``steps`` the attention-mining steps T (Eq. 7-8).
    """
    ex = get_explainer(SHORT_NAMES.get(method, method))
    if ex.box_rule is None:
        raise ValueError(f"method '{ex.name}' proposes no boxes")
    x = image[None] if image.dim() == 3 else image
    args = (x,) if negative is None else (x, negative[None] if negative.dim() == 3 else negative)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    gradcam = isinstance(ex, GradCamExplainer)
    layer = model.feature_layer() if gradcam else None
    with capture_activation(layer) as store, torch.set_grad_enabled(gradcam):
        out = model(*args)
    probs = _probabilities(out)
    if gradcam and classes:
        maps = gradcam_from_activation(out["logits"], store["act"], list(classes))[0].detach()
        heats = dict(zip(classes, maps))
    else:
        ctx = {} if steps is None else {"steps": steps}
        with torch.no_grad():
            heats = {c: ex.explain(out, c, model=model, inputs=x, **ctx)[ex.box_map][0] for c in classes}
    boxes = [b for c in classes for b in ex.box_rule(heats[c], label=CLASSES[c], image_size=size)]
    return probs, boxes


def evaluate_model(model: torch.nn.Module, dataset: Any, *, method: str = "cam", train_boxes: Sequence[Box] = (),
                   negatives: Callable[[int], torch.Tensor] | None = None, steps: int | None = None) -> dict:
    """AUROC per class on all of ``dataset`` and localisation tables on its boxed images.

    ``dataset`` items follow :mod:`training.data.dataset` (image, labels, boxes in input pixels);
    boxes by :func:`single_model_boxes`; ``train_boxes`` (input pixels) give the floor;
    ``negatives(i) -> image`` pairs a normal for CIA networks.
    """
    name = get_explainer(SHORT_NAMES.get(method, method)).name
    model.eval()
    dev = next(model.parameters()).device
    probs, labels = [], []
    preds: dict[int, list[Box]] = {}
    gts: dict[int, list[Box]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        gt = _boxes_of(item["boxes"])
        cls = sorted({CLASSES.index(b.label) for b in gt if b.label in BOXED_CLASSES})
        neg = negatives(i).to(dev) if negatives is not None else None
        p, b = single_model_boxes(model, item["image"].to(dev), cls, name, negative=neg, steps=steps)
        probs.append(p)
        labels.append(item["labels"].numpy())
        if gt:
            preds[i], gts[i] = b, gt
    loc = _loc_json(preds, gts)
    result = {"method": name, "n_images": len(dataset), "n_boxed_images": len(gts),
              **_auroc_json(probs, labels, CLASSES), **loc}
    result.update(_floor_json(train_boxes, gts))
    return result


# ---- JSON and markdown ------------------------------------------------------------------------
def _num(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _table_json(table: Mapping[float, Mapping[str, LocResult]]) -> dict:
    return {f"{t:g}": {c: {"acc": _num(r.accuracy), "afp": _num(r.afp), "n": r.n_images}
                       for c, r in row.items()} for t, row in table.items()}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _method_title(name: str, entry: Mapping) -> str:
    if entry.get("title"):
        return f"{entry['title']} (`{name}`)"
    try:
        return f"{get_explainer(name).title} (`{name}`)"
    except CxrError:
        return name


def _loc_markdown(tab: Mapping, label: str, name: str, ths: Sequence[float]) -> list[str]:
    short = [c.replace("_", " ") for c in BOXED_CLASSES]
    lines = [f"Localisation accuracy, {label}, {name} (n boxed images per class in the last row)", "",
             "| " + " | ".join([name] + short + ["Mean"]) + " |", "|" + "---|" * (len(short) + 2)]
    for t in ths:
        row = tab[f"{t:g}"]
        accs = [row[c]["acc"] for c in BOXED_CLASSES]
        vals = [a for a in accs if a is not None]
        mean = sum(vals) / len(vals) if vals else None
        lines.append("| " + " | ".join([f"{t:g}"] + [_fmt(a) for a in accs] + [_fmt(mean)]) + " |")
    n_row = tab[f"{ths[0]:g}"]
    return lines + ["| n | " + " | ".join(str(n_row[c]["n"]) for c in BOXED_CLASSES) + " | |", ""]


def markdown_tables(result: Mapping, *, title: str = "") -> str:
    """The papers' layout: per method (then the floor) one row per threshold, one column per boxed
    class, then the mean; then AUROC per class."""
    lines = [f"## {title}".rstrip(), ""] if title else []
    methods = result.get("methods") or ({result["method"]: {"iou": result.get("iou"), "iobb": result.get("iobb")}}
                                        if "method" in result else {})
    blocks = [(_method_title(n, e), e) for n, e in methods.items()]
    blocks.append(("floor (median training box)", {"iou": result.get("floor_iou"), "iobb": result.get("floor_iobb")}))
    for label, entry in blocks:
        for key, name, ths in (("iou", "T(IoU)", IOU_THRESHOLDS), ("iobb", "T(IoBB)", IOBB_THRESHOLDS)):
            if entry.get(key):
                lines += _loc_markdown(entry[key], label, name, ths)
    auroc = result.get("auroc")
    if auroc:
        names = list(auroc)
        lines += ["AUROC per class", "", "| " + " | ".join([c.replace("_", " ") for c in names] + ["Mean"]) + " |",
                  "|" + "---|" * (len(names) + 1),
                  "| " + " | ".join([_fmt(auroc[c]) for c in names] + [_fmt(result.get("mean_auroc"))]) + " |", ""]
    return "\n".join(lines)


def write_report(result: Mapping, out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``metrics.json`` and ``tables.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "metrics.json", out / "tables.md"
    j.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m.write_text(markdown_tables(result, title=title) + "\n", encoding="utf-8")
    return j, m
