"""Evaluation tables laid out like the papers' tables.

:func:`evaluate_pipeline` scores the app's own pipeline (:class:`cxrviewer.core.pipeline.Pipeline`,
the one behind the viewer and ``cxrviewer analyze``): each study is loaded as the app loads it,
run through the same preprocessing, alignment, crop and map resolution, and every explainer
that proposes boxes (:mod:`cxrviewer.core.explain.registry`: ``proposes_boxes``, a ``box_rule``
or its own ``propose_boxes``) is scored on the boxes it proposed, in ORIGINAL pixels, against the
ground-truth boxes. A newly registered method is scored without touching this file.

* AUROC per class from the pipeline's probabilities (as the app shows them), every test image.
* Localisation, ChestX-ray8 protocol (baseline-cam-space-attention-gated.txt Sec. 5.2), for the
  eight boxed classes at T(IoU) 0.1..0.7 and T(IoBB) 0.1/0.25/0.5/0.75/0.9: for class c the
  evaluated images are the test images with a ground-truth box of c (n); an image is a hit when a
  predicted box of c overlaps a GT box of c above T; AFP = predicted boxes of c that overlap no GT
  box of c above T, summed over those n images, / n (:data:`EVALUATED_IMAGES`).
* Three box budgets (:data:`BUDGETS`): one box per class (the highest-scoring box of c per image),
  top-3 per class, and every proposed box (the JSON's plain ``iou`` / ``iobb``).
* References beside every method: the ``prior`` explainer (cxrviewer/core/explain/prior.py, one
  fixed median box per class as fractions of the image), which here gets the prior of the
  evaluated fold's TRAINING boxes (``prior_boxes``; without them it is the bundle's or the shipped
  one, computed from ALL official NIH boxes and titled "prior (shipped, all NIH boxes: optimistic
  on NIH)"), and the model-free floor (median training box per class in pixels, METHODS.md
  "Always report the floor"). The explainer's ``title`` attribute of the run names its row.

:func:`evaluate_model` scores a bare network on a training dataset in its input space (for the
trainers and the benchmarks, whose models are not bundles yet); its boxes come from the same
registry box rules through the single-model API (:meth:`Explainer.explain`), and Grad-CAM from
:mod:`cxrviewer.core.explain.gradcam` on one forward.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES
from cxrviewer.core.errors import CxrError
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.gradcam import GradCamExplainer, capture_activation, gradcam_from_activation
from cxrviewer.core.explain.metrics import (IOBB_THRESHOLDS, IOU_THRESHOLDS, LocResult, auroc_per_class,
                                            floor_boxes, localization_table, top_boxes)
from cxrviewer.core.explain.prior import OPTION as PRIOR_OPTION
from cxrviewer.core.explain.prior import location_prior
from cxrviewer.core.geometry import Box

if TYPE_CHECKING:
    from cxrviewer.core.explain.registry import Explainer
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.study import Study

log = logging.getLogger(__name__)

__all__ = ["BUDGETS", "EVALUATED_IMAGES", "FLOOR_TITLE", "PROTOCOL", "evaluate_model", "evaluate_pipeline",
           "markdown_tables", "predictions_method_of", "scored_explainers", "single_model_boxes", "write_report"]

#: Short method names :func:`evaluate_model` also accepts (``cia`` is what training/trainers/cia.py passes).
SHORT_NAMES = {"am": "attention_mining", "cia": "contrast"}
#: Training boxes for the floor: one list for every test image, or a list per record key
#: (e.g. the boxes of the other folds when every image is a test image).
TrainBoxes = Sequence[Box] | Mapping[str, Sequence[Box]]
#: box budgets: JSON key -> (boxes kept per class and image, None: all; words in the tables). ``all``
#: is stored under the plain ``iou`` / ``iobb`` keys, the others as ``{budget: {"iou", "iobb"}}``.
BUDGETS: dict[str, tuple[int | None, str]] = {
    "top1": (1, "one box per class (the highest-scoring box of each class per image; the prior's one box)"),
    "top3": (3, "top-3 boxes per class (the three highest-scoring boxes of each class per image)"),
    "all": (None, "every proposed box (as the app draws them)"),
}
#: which images the accuracy and the AFP of a class are computed over
EVALUATED_IMAGES = ("for class c: the test images with a ground-truth box of c (n); a hit: a predicted box of c "
                    "overlapping a GT box of c above T; AFP: predicted boxes of c overlapping no GT box of c above T, "
                    "summed over those images / n (boxes of c on images without a GT box of c are not counted)")
#: the words under the title of every tables.md
PROTOCOL = ("ChestX-ray8 protocol, in original pixels. " + EVALUATED_IMAGES[0].upper() + EVALUATED_IMAGES[1:] + ".")
#: the floor's row label
FLOOR_TITLE = "floor (median training box, pixels)"


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


def _nih_name(name: str) -> str:
    """The NIH name of a model's class (by spelling/synonym, e.g. VinDr's "Pleural effusion" ->
    "Effusion"), else the name itself (scored against nothing: :func:`not_scored`)."""
    from cxrviewer.core.labelsets import NIH14

    return NIH14.canonical(name) or name


def not_scored(classes: Sequence[str]) -> dict[str, str]:
    """Per class of a model that the NIH labels and boxes cannot score: the reason."""
    from cxrviewer.core.labelsets import NIH14

    return {c: "not an NIH ChestX-ray14 class: the NIH labels and boxes have none of it (AUROC and "
               "localisation not scored)" for c in classes if c not in NIH14}


def _labels(study: "Study", classes: Sequence[str]) -> np.ndarray:
    have = study.labels or {}
    return np.array([float(have.get(_nih_name(c), 0) > 0) for c in classes], dtype=np.float32)


def evaluate_pipeline(pipeline: "Pipeline", records: Sequence[Any], *, train_boxes: TrainBoxes = (),
                      prior_boxes: TrainBoxes = (), prior_title: str = "", methods: Sequence[str] | None = None,
                      progress: Callable[[int, int, str], None] | None = None,
                      predictions_method: str | None = None) -> dict:
    """AUROC and localisation tables of ``pipeline`` on ``records`` (see the module docstring).

    ``records``: :class:`~cxrviewer.core.io.StudyRef` s (or training records) with labels and
    ground-truth boxes. ``train_boxes`` (original pixels) give the floor, ``prior_boxes`` (fractions
    of each box's image) the ``prior`` explainer's boxes through the pipeline option
    :data:`cxrviewer.core.explain.prior.OPTION`, named ``prior_title`` in the tables (both: one
    list for every record or a list per record key, :data:`TrainBoxes`; without ``prior_boxes``
    the prior is the bundle's or the shipped one). ``methods``: explainer names to score (default:
    every one that proposes boxes and runs with the loaded bundles). ``progress(i, n, key)`` is
    called after each study. A study that cannot be loaded or analysed is listed under ``failed``.
    ``predictions_method``: the box method of the per-study predictions (default: the app's
    default box method among the scored ones, :func:`predictions_method`).

    Returns ``{"auroc": {class: v}, "mean_auroc", "auroc_role", "methods": {name: {"title", "iou",
    "iobb" (every proposed box), "top1": {"iou", "iobb"}, "top3": {...}}}, "floor_iou", "floor_iobb",
    "floor": {"title", "iou", "iobb"}, "budgets", "evaluated_images", "n_images", "n_boxed_images",
    "curves" (:func:`cxrviewer.core.curves.curves_json`: ROC, PR and reliability of the same
    probabilities), "predictions" (rows of predictions.csv, :func:`training.eval_outputs.prediction_rows`),
    "predictions_method", ...}``; a table is ``{threshold: {class: {"acc", "afp", "n", "hits", "fps"}}}``.
    """
    scorers = scored_explainers(pipeline, methods)
    box_method = predictions_method_of([e.name for e in scorers], predictions_method)
    run = _Run(pipeline, scorers, box_method)
    priors = _Priors(prior_boxes, prior_title or "prior (median box of the given training boxes)")
    if priors and "prior" in run.titles:
        run.titles["prior"] = priors.title
    had = pipeline.options.get(PRIOR_OPTION, _NONE)
    try:
        for i, rec in enumerate(records):
            key = str(getattr(rec, "key", i))
            if priors:
                pipeline.options[PRIOR_OPTION] = priors(key)
            run.add(key, rec)
            if progress is not None:
                progress(i + 1, len(records), key)
    finally:
        if had is _NONE:
            pipeline.options.pop(PRIOR_OPTION, None)
        else:
            pipeline.options[PRIOR_OPTION] = had
    out: dict[str, Any] = {"n_images": len(records) - len(run.failed), "n_boxed_images": len(run.gts),
                           "classes": list(run.classes), "boxed_classes": list(BOXED_CLASSES),
                           **_auroc_json(run.probs, run.labels, run.classes, "classifier"),
                           "methods": {e.name: {"title": run.titles[e.name], **_loc_json(run.preds[e.name], run.gts)}
                                       for e in scorers},
                           "budgets": {k: words for k, (_, words) in BUDGETS.items()},
                           "evaluated_images": EVALUATED_IMAGES, "frame": "original pixels"}
    out.update(_floor_json(train_boxes, run.gts))
    out.update(_per_study_json(run, box_method))
    if not_scored(run.classes):
        out["not_scored"] = not_scored(run.classes)
        log.warning("evaluate: %d classes of the models are not NIH classes and are not scored: %s",
                    len(out["not_scored"]), ", ".join(out["not_scored"]))
    if run.failed:
        out["failed"] = run.failed
    return out


_NONE = object()


class _Run:
    """What :func:`evaluate_pipeline` collects study by study."""

    def __init__(self, pipeline: "Pipeline", scorers: Sequence["Explainer"], box_method: str | None) -> None:
        self.pipeline, self.scorers, self.box_method = pipeline, scorers, box_method
        self.classes = tuple(pipeline.classes)
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.preds: dict[str, dict[str, list[Box]]] = {e.name: {} for e in scorers}
        self.titles = {e.name: e.title for e in scorers}
        self.gts: dict[str, list[Box]] = {}
        self.failed: list[dict[str, str]] = []
        self.keys: list[str] = []  # the studies with probabilities, in the order of probs / labels
        #: the predictions method's best box per class of every study (the rows of predictions.csv)
        self.top: dict[str, dict[str, list[Box]]] = {box_method: {}} if box_method else {}
        self.all_gts: dict[str, list[Box]] = {}

    def add(self, key: str, rec: Any) -> None:
        """Run one study; its probabilities, and its boxes when it has ground-truth boxes."""
        try:
            study = _load(rec)
            res = self.pipeline.run(study)
        except CxrError as exc:
            log.warning("%s: %s", key, exc)
            self.failed.append({"key": key, "error": str(exc)})
            return
        if res.probabilities is not None:
            self.classes = tuple(res.classes)
            self.probs.append(np.asarray(res.probabilities, np.float64))
            self.labels.append(_labels(study, self.classes))
            self.keys.append(key)
        self.all_gts[key] = list(study.gt_boxes or [])
        for e in self.scorers:
            self.titles[e.name] = str(res.attr(e.name, "title", self.titles[e.name]))
        if self.box_method:
            self.top[self.box_method][key] = top_boxes([replace(b, label=_nih_name(b.label))
                                                        for b in res.boxes.get(self.box_method, [])], 1)
        if study.gt_boxes:
            self.gts[key] = list(study.gt_boxes)
            for e in self.scorers:
                self.preds[e.name][key] = [replace(b, label=_nih_name(b.label))
                                           for b in res.boxes.get(e.name, [])]


def predictions_method_of(scored: Sequence[str], requested: str | None = None) -> str | None:
    """The box method of predictions.csv: ``requested`` (must be among ``scored``), else the app's
    default box method among ``scored`` (:func:`cxrviewer.core.panels.default_box_method`), else
    the first scored one that is not the prior, else the prior."""
    from cxrviewer.core.panels import default_box_method

    if requested is not None:
        if requested not in scored:
            raise ValueError(f"predictions method '{requested}' is not scored (scored: {', '.join(scored) or 'none'})")
        return requested
    others = [m for m in scored if m != "prior"]
    return default_box_method(others) or (others[0] if others else (scored[0] if scored else None))


def _per_study_json(run: "_Run", method: str | None) -> dict:
    """``curves`` of the AUROC's probabilities and the per-study ``predictions`` rows."""
    from cxrviewer.core.curves import curves_json

    from .eval_outputs import prediction_rows

    if not run.probs or len(run.probs[0]) != len(run.classes):
        return {}
    probs, labels = np.stack(run.probs), np.stack(run.labels)
    rows = prediction_rows(run.keys, probs, labels, run.classes, [_nih_name(c) for c in run.classes],
                           method or "", run.top.get(method or "", {}), run.all_gts)
    return {"curves": curves_json(probs, labels, run.classes), "predictions": rows, "predictions_method": method}


def _per_key(boxes: TrainBoxes, key: Hashable) -> Sequence[Box]:
    return boxes.get(key, ()) if isinstance(boxes, Mapping) else boxes


class _Priors:
    """The prior option of each record: :func:`location_prior` of its training boxes (fractions),
    computed once per distinct box list; falsy when no training boxes were given."""

    def __init__(self, boxes: TrainBoxes, title: str) -> None:
        self.boxes, self.title = boxes, title
        self._cache: dict[int, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.boxes)

    def __call__(self, key: str) -> dict[str, Any]:
        tb = _per_key(self.boxes, key)
        if id(tb) not in self._cache:
            self._cache[id(tb)] = {**location_prior(tb), "title": self.title, "source": "evaluation training boxes"}
        return self._cache[id(tb)]


def _auroc_json(probs: list[np.ndarray], labels: list[np.ndarray], classes: Sequence[str],
                role: str | None = None) -> dict:
    """``auroc`` per class and ``mean_auroc``; ``auroc_role``: the pipeline role whose
    probabilities they are (the classifier's one forward, ``ExplainContext.classifier_pass``)."""
    if not probs or len(probs[0]) != len(classes):
        return {"auroc": None, "mean_auroc": None}
    au = auroc_per_class(np.stack(probs), np.stack(labels))
    out = {"auroc": {c: _num(v) for c, v in zip(classes, au)},
           "mean_auroc": _num(np.nanmean(au)) if np.isfinite(au).any() else None}
    return {**out, "auroc_role": role} if role else out


def _loc_json(preds: Mapping[Hashable, Sequence[Box]], gts: Mapping[Hashable, Sequence[Box]]) -> dict:
    """``iou`` / ``iobb``: every proposed box (budget ``all``); ``top1`` / ``top3``: ``{"iou", "iobb"}``
    of the highest-scoring box(es) of each class per image (:data:`BUDGETS`)."""
    out: dict[str, Any] = {}
    for budget, (k, _) in BUDGETS.items():
        kept = preds if k is None else {img: top_boxes(b, k) for img, b in preds.items()}
        tabs = {m: _table_json(localization_table(kept, gts, metric=m)) for m in ("iou", "iobb")}
        if k is None:
            out.update(tabs)
        else:
            out[budget] = tabs
    return out


def _floor_json(train_boxes: TrainBoxes, gts: Mapping[Hashable, Sequence[Box]]) -> dict:
    """``floor_iou`` / ``floor_iobb`` (also as ``floor: {"title", "iou", "iobb"}``): the median
    training box of each class placed on every boxed test image (per image from its own training
    boxes when ``train_boxes`` is a mapping). One box per class: the same under every budget."""
    if not train_boxes:
        return {}
    medians: dict[int, list[Box]] = {}
    preds = {}
    for k in gts:
        tb = _per_key(train_boxes, k)
        if id(tb) not in medians:
            medians[id(tb)] = list(floor_boxes(tb).values())
        preds[k] = medians[id(tb)]
    tabs = {m: _table_json(localization_table(preds, gts, metric=m)) for m in ("iou", "iobb")}
    return {"floor_iou": tabs["iou"], "floor_iobb": tabs["iobb"], "floor": {"title": FLOOR_TITLE, **tabs}}


# ---- a bare network on a training dataset (input space) ---------------------------------------
def _boxes_of(arr: torch.Tensor, classes: Sequence[str] = CLASSES) -> list[Box]:
    return [Box(classes[int(r[0])], float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in arr.tolist()]


def _probabilities(out: Mapping[str, torch.Tensor]) -> np.ndarray:
    if "logits" in out:
        return torch.sigmoid(out["logits"][0].detach().float()).cpu().numpy()
    if "image_probs" in out:
        return out["image_probs"][0].detach().float().cpu().numpy()
    grid = out["grid_probs"][0].detach().flatten(1).float()  # cia-net Eq. 4: P(class) = 1 - prod(1 - p_ij)
    return (1 - torch.prod(1 - grid, dim=1)).cpu().numpy()


def single_model_boxes(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], method: str = "cam",
                       *, negative: torch.Tensor | None = None, steps: int | None = None,
                       names: Sequence[str] = CLASSES) -> tuple[np.ndarray, list[Box]]:
    """Probabilities ``[C]`` and the boxes (input pixels) of explainer ``method`` for ``classes``
    on one image ``[1, S, S]``, from ONE forward of ``model``.

    Boxes come from the explainer's ``box_map`` through its ``box_rule``; ``negative`` is the
    paired normal image of a CIA network; ``steps`` the attention-mining steps T (Eq. 7-8);
    ``names``: the model's class names (the boxes' labels; default the NIH 14).
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
    boxes = [b for c in classes for b in ex.box_rule(heats[c], label=names[c], image_size=size)]
    return probs, boxes


def evaluate_model(model: torch.nn.Module, dataset: Any, *, method: str = "cam", train_boxes: Sequence[Box] = (),
                   negatives: Callable[[int], torch.Tensor] | None = None, steps: int | None = None) -> dict:
    """AUROC per class on all of ``dataset`` and localisation tables on its boxed images.

    ``dataset`` items follow :mod:`training.data.dataset` (image, labels, boxes in input pixels);
    boxes by :func:`single_model_boxes`; ``train_boxes`` (input pixels) give the floor;
    ``negatives(i) -> image`` pairs a normal for CIA networks. The classes are the dataset's
    (``dataset.classes``, default the NIH 14); localisation is scored on the NIH boxed 8 for the NIH
    14, on every class with a box for another set (:func:`training.data.labels.boxed_classes`).
    """
    from .data.labels import boxed_classes

    classes = tuple(getattr(dataset, "classes", CLASSES))
    boxed = set(boxed_classes(classes))
    name = get_explainer(SHORT_NAMES.get(method, method)).name
    model.eval()
    dev = next(model.parameters()).device
    probs, labels = [], []
    preds: dict[int, list[Box]] = {}
    gts: dict[int, list[Box]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        gt = _boxes_of(item["boxes"], classes)
        cls = sorted({classes.index(b.label) for b in gt if b.label in boxed})
        neg = negatives(i).to(dev) if negatives is not None else None
        p, b = single_model_boxes(model, item["image"].to(dev), cls, name, negative=neg, steps=steps, names=classes)
        probs.append(p)
        labels.append(item["labels"].numpy())
        if gt:
            preds[i], gts[i] = b, gt
    loc = _loc_json(preds, gts)
    result = {"method": name, "n_images": len(dataset), "n_boxed_images": len(gts),
              **_auroc_json(probs, labels, classes), **loc}
    result.update(_floor_json(train_boxes, gts))
    return result


# ---- JSON and markdown ------------------------------------------------------------------------
def _num(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _table_json(table: Mapping[float, Mapping[str, LocResult]]) -> dict:
    return {f"{t:g}": {c: {"acc": _num(r.accuracy), "afp": _num(r.afp), "n": r.n_images,
                           "hits": r.n_correct, "fps": r.n_false_positives}
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


def _mean(vals: Sequence[float | None]) -> float | None:
    have = [v for v in vals if v is not None]
    return sum(have) / len(have) if have else None


def _rows(result: Mapping) -> list[tuple[str, Mapping]]:
    """(row label, entry) of every method, then the floor (one box per class under every budget)."""
    methods = result.get("methods") or ({result["method"]: {k: result.get(k) for k in ("iou", "iobb", *BUDGETS)}}
                                        if "method" in result else {})
    rows = [(_method_title(n, e), e) for n, e in methods.items()]
    floor = {"iou": result.get("floor_iou"), "iobb": result.get("floor_iobb")}
    if floor["iou"] or floor["iobb"]:
        rows.append((FLOOR_TITLE, {**floor, **{b: floor for b in BUDGETS if b != "all"}}))
    return rows


def _budget_table(rows: Sequence[tuple[str, Mapping]], budget: str, metric: str, name: str,
                  ths: Sequence[float]) -> list[str]:
    """One table: a row per (method, threshold), a column per boxed class ("accuracy / AFP")."""
    tabs = [(label, (e.get(budget) or {}).get(metric) if budget != "all" else e.get(metric)) for label, e in rows]
    tabs = [(label, tab) for label, tab in tabs if tab]
    if not tabs:
        return []
    short = [c.replace("_", " ") for c in BOXED_CLASSES]
    lines = [f"Localisation accuracy / AFP at {name}, {BUDGETS[budget][1]}", "",
             "| " + " | ".join(["method", name] + short + ["Mean"]) + " |", "|" + "---|" * (len(short) + 3)]
    for label, tab in tabs:
        for i, t in enumerate(ths):
            row = tab[f"{t:g}"]
            cells = [f"{_fmt(row[c]['acc'])} / {_fmt(row[c]['afp'])}" for c in BOXED_CLASSES]
            mean = (f"{_fmt(_mean([row[c]['acc'] for c in BOXED_CLASSES]))} / "
                    f"{_fmt(_mean([row[c]['afp'] for c in BOXED_CLASSES]))}")
            lines.append("| " + " | ".join(["" if i else label, f"{t:g}"] + cells + [mean]) + " |")
    n_row = tabs[0][1][f"{ths[0]:g}"]
    return lines + ["| n (images with a GT box of the class) | | "
                    + " | ".join(str(n_row[c]["n"]) for c in BOXED_CLASSES) + " | |", ""]


def markdown_tables(result: Mapping, *, title: str = "") -> str:
    """Per budget (one box per class, top-3, every proposed box) and overlap (T(IoU), T(IoBB)) one
    table: a row per method and threshold (the prior among the methods, the floor last), a column
    per boxed class with "accuracy / AFP", then the mean; then AUROC per class."""
    lines = [f"## {title}".rstrip(), ""] if title else []
    lines += [PROTOCOL, ""]
    rows = _rows(result)
    for budget in BUDGETS:
        for metric, name, ths in (("iou", "T(IoU)", IOU_THRESHOLDS), ("iobb", "T(IoBB)", IOBB_THRESHOLDS)):
            lines += _budget_table(rows, budget, metric, name, ths)
    auroc = result.get("auroc")
    if auroc:
        names = list(auroc)
        lines += ["AUROC per class (the classifier's probabilities as the app computes them, every test image)", "",
                  "| " + " | ".join([c.replace("_", " ") for c in names] + ["Mean"]) + " |",
                  "|" + "---|" * (len(names) + 1),
                  "| " + " | ".join([_fmt(auroc[c]) for c in names] + [_fmt(result.get("mean_auroc"))]) + " |", ""]
    ap = result.get("average_precision")
    if ap:
        lines += ["Average precision per class (the same probabilities; the area under the precision-recall step "
                  "curve)", "", "| " + " | ".join([c.replace("_", " ") for c in ap] + ["Mean"]) + " |",
                  "|" + "---|" * (len(ap) + 1),
                  "| " + " | ".join([_fmt(v) for v in ap.values()] + [_fmt(_mean(list(ap.values())))]) + " |", ""]
    if result.get("ece") is not None:
        lines += [f"Expected calibration error (10 bins, every study and class): {_fmt(result['ece'])}", ""]
    if result.get("outputs"):
        lines += ["Also written: " + ", ".join(result["outputs"]) + " (predictions.csv: per study and class, "
                  f"with the boxes of `{result.get('predictions_method')}`)", ""]
    return "\n".join(lines)


def write_report(result: Mapping, out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``metrics.json`` and ``tables.md`` in ``out_dir``; with ``curves`` / ``predictions`` in
    ``result`` also the curve data and PNGs and predictions.csv (:mod:`training.eval_outputs`).
    metrics.json keeps the curves thinned to 101 points each (``curves``, what a model card
    carries), ``average_precision`` and ``ece``, and lists the files under ``outputs``."""
    from cxrviewer.core.curves import thin_curves

    from .eval_outputs import write_outputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "metrics.json", out / "tables.md"
    curves = result.get("curves")
    files = write_outputs(curves, result.get("predictions"), out, title=title)
    result = {k: v for k, v in result.items() if k != "predictions"}
    if curves:
        result.update(curves=thin_curves(curves), average_precision={c: r["ap"] for c, r in curves["pr"].items()},
                      ece=curves["calibration"]["all"]["ece"])
    if files:
        result["outputs"] = files
    j.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m.write_text(markdown_tables(result, title=title) + "\n", encoding="utf-8")
    return j, m
