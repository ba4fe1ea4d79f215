"""Compare model bundles on the studies of an annotation project (the fine-tune panel's before/after).

    cxr-train compare --annotations PROJECT.cxrann --new NEW.cxrbundle [--old OLD.cxrbundle] --out compare.json

Every study of the project with labels or accepted boxes (and a readable image) is run through each
bundle (classifier: Grad-CAM boxes; CIA-Net: its contrast map with the bundle's normal bank, as
``cxr-train evaluate``'s single-model scoring does). Per bundle:

* AUROC per class over the studies where the user set that class present or absent (a box of the
  class counts as present; uncertain and unset studies are left out); ``mean_auroc`` over the
  classes with both a positive and a negative study;
* localisation accuracy at T(IoU) = 0.3 against the user's boxes (ChestX-ray8 protocol: an image
  with a box of class c is a hit when a predicted box of c overlaps one of them by IoU >= 0.3),
  per class and ``loc_iou_0.3`` (mean over the classes with a box);

and the same localisation for the fixed-box prior (one median box per class, the new bundle's own
prior, else the shipped NIH one). A model's classes are matched to the project's labels by name and
synonym. The new model was trained on these studies: its numbers are optimistic (the JSON says so).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrviewer.core.geometry import Box

#: what ``cxr-train compare --help`` says
DESCRIPTION = """Score model bundles on the studies of an annotation project: AUROC where the user set
labels, localisation accuracy at IoU 0.3 against the user's boxes, and the fixed-box prior beside
them. Writes one JSON file (--out). The fine-tune panel runs it after a fine-tune to show the old
and the new model side by side."""
EXAMPLES = """  cxr-train compare --annotations project.cxrann --old resources/models/nih-cia.cxrbundle \\
      --new finetuned.cxrbundle --out finetuned.compare.json"""

log = logging.getLogger(__name__)

#: the T(IoU) of the localisation accuracy
IOU = 0.3
#: what the JSON says about the new model's numbers
CAVEAT = ("scored on the project's own studies, which the new model was trained on (its numbers are "
          "optimistic; a held-out set gives fair ones: cxr-train evaluate)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cxr-train compare``."""
    p.add_argument("--annotations", required=True, help="the annotation project (.cxrann)")
    p.add_argument("--new", required=True, help="the new (fine-tuned) bundle")
    p.add_argument("--old", default=None, help="the bundle it replaces (optional)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--status", action="append", default=None,
                   help="only studies of this review status (repeatable; default: every annotated study)")
    p.add_argument("--device", default="cpu", help="cpu|cuda|auto")


def project_studies(store_path: str | os.PathLike, status: list[str] | None = None) -> tuple[Any, list]:
    """(label set, [(path, {label: 1/0/-1}, [Box])]) of the project's studies with labels or boxes
    and a readable image."""
    from cxrviewer.core.annotations import AnnotationStore, iter_training_records

    out = []
    with AnnotationStore(store_path, read_only=True) as store:
        label_set = store.label_set
        for tr in iter_training_records(store, status=status):
            if (tr.labels or tr.boxes) and tr.path and Path(tr.path).is_file():
                out.append((Path(tr.path), dict(tr.labels), list(tr.boxes)))
    return label_set, out


def _records(studies: list, label_set: Any, classes: list[str]) -> tuple[list, np.ndarray]:
    """Training records in ``classes`` order and a ``[N, C]`` mask of the labels the user set."""
    from training.data.records import Record

    to_model = {}
    for c in classes:
        p = label_set.canonical(c)
        if p is not None:
            to_model.setdefault(p, c)
    recs, mask = [], np.zeros((len(studies), len(classes)), bool)
    for i, (path, labels, boxes) in enumerate(studies):
        y = np.zeros(len(classes), np.float32)
        kept = [replace(b, label=to_model[b.label]) for b in boxes if b.label in to_model]
        for p, c in to_model.items():
            j = classes.index(c)
            v = labels.get(p)
            if any(b.label == c for b in kept):
                v = 1
            if v in (0, 1):
                y[j], mask[i, j] = float(v), True
        recs.append(Record(path, path.stem, y, kept, f"project:{path.stem}"))
    return recs, mask


def _auroc(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, classes: list[str]) -> dict:
    """``auroc`` per class over the studies whose label was set, ``mean_auroc``, ``n_labelled``."""
    from cxrviewer.core.explain.metrics import auroc

    per = {}
    for j, c in enumerate(classes):
        m = mask[:, j]
        v = auroc(probs[m, j], labels[m, j]) if m.any() else float("nan")
        if np.isfinite(v):
            per[c] = float(v)
    return {"auroc": per, "mean_auroc": float(np.mean(list(per.values()))) if per else None,
            "n_labelled": int(mask.any(axis=1).sum())}


def _localisation(preds: dict, gts: dict) -> dict:
    """``loc`` per class with a user box (accuracy at T(IoU) = :data:`IOU`) and ``loc_iou_0.3``, ``n_boxed``."""
    from cxrviewer.core.explain.metrics import localization_table

    labels = sorted({b.label for bs in gts.values() for b in bs})
    table = localization_table(preds, gts, labels=labels, thresholds=[IOU])[IOU] if labels else {}
    per = {c: float(r.accuracy) for c, r in table.items() if r.n_images}
    return {"loc": per, f"loc_iou_{IOU}": float(np.mean(list(per.values()))) if per else None,
            "n_boxed": len(gts)}


def score_bundle(path: str | os.PathLike, studies: list, label_set: Any, device: str = "cpu") -> dict:
    """One bundle's AUROC and localisation on ``studies`` (:func:`project_studies`), and its dataset."""
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.preprocess import Preprocess

    from ..data import ChestDataset
    from ..evaluate import single_model_boxes
    from ..trainers.cia import bank_negatives

    b = load_bundle(path, device=device)
    m = b.manifest
    classes = list(m.classes)
    recs, mask = _records(studies, label_set, classes)
    ds = ChestDataset(recs, int(m.input_size[0]), preprocess=Preprocess.from_normalisation(m.normalisation),
                      classes=classes)
    role = m.role or m.family
    method = {"cia": "cia", "classifier": "cam"}.get(role)
    if method is None:
        raise SystemExit(f"cxr-train compare: {path} is a {role} bundle; only classifier and CIA-Net "
                         "bundles are compared")
    negatives = bank_negatives(b, ds) if role == "cia" else None
    probs, preds, gts = [], {}, {}
    for i in range(len(ds)):
        item = ds[i]
        gt = [Box(classes[int(r[0])], *map(float, r[1:5])) for r in item["boxes"].tolist()]
        cls = sorted({classes.index(g.label) for g in gt})
        neg = negatives(i).to(device) if negatives is not None else None
        p, boxes = single_model_boxes(b.model, item["image"].to(device), cls, method, negative=neg, names=classes)
        probs.append(p)
        if gt:
            preds[i], gts[i] = boxes, gt
    labels = np.stack([r.labels for r in recs]) if recs else np.zeros((0, len(classes)))
    out = {"name": b.name, "path": str(path), "role": role, "classes": classes,
           **_auroc(np.stack(probs) if probs else labels, labels, mask, classes), **_localisation(preds, gts)}
    out["_dataset"] = (ds, gts, b)
    return out


def prior_scores(bundle: Any, dataset: Any, gts: dict) -> dict:
    """The fixed-box prior's localisation on ``gts`` (input pixels of ``dataset``): the bundle's own
    prior (its provenance), else the shipped NIH one."""
    from cxrviewer.core.explain.labels import nih_lookup
    from cxrviewer.core.explain.prior import SHIPPED_TITLE, bundle_prior, load_prior

    own = bundle_prior({bundle.manifest.role or bundle.manifest.family: bundle})
    prior, title = (own[1], f"prior ({own[0]}'s training boxes)") if own else (load_prior(), SHIPPED_TITLE)
    size = float(dataset.size)
    fractions = {c: nih_lookup(prior.get("boxes", {}), c) for c in dataset.classes}
    preds = {i: [Box(c, f[0] * size, f[1] * size, f[2] * size, f[3] * size)
                 for c, f in fractions.items() if f is not None] for i in gts}
    return {"name": "fixed-box prior", "title": title, **_localisation(preds, gts)}


def compare(store: str | os.PathLike, new: str | os.PathLike, old: str | os.PathLike | None = None, *,
            status: list[str] | None = None, device: str = "cpu") -> dict:
    """``{"old", "new", "prior", "n_studies", "caveat", ...}`` (see the module docstring)."""
    label_set, studies = project_studies(store, status)
    if not studies:
        raise SystemExit(f"cxr-train compare: {store} has no annotated study with a readable image")
    out: dict[str, Any] = {"annotations": str(store), "n_studies": len(studies), "iou": IOU, "caveat": CAVEAT,
                           "label_set": label_set.name}
    res_new = score_bundle(new, studies, label_set, device)
    ds, gts, bundle = res_new.pop("_dataset")
    out["new"] = res_new
    out["prior"] = prior_scores(bundle, ds, gts)
    if old:
        res_old = score_bundle(old, studies, label_set, device)
        res_old.pop("_dataset")
        out["old"] = res_old
    return out


def run(args: argparse.Namespace) -> int:
    """Compare, write ``--out`` (atomically) and print ``{"compare": OUT}``."""
    from cxrviewer.core.annotations.export import atomic_write
    from cxrviewer.core.errors import CxrError

    try:
        result = compare(args.annotations, args.new, args.old, status=args.status, device=args.device)
    except CxrError as err:
        raise SystemExit(f"cxr-train compare: {err}") from err
    out = Path(args.out)
    try:
        atomic_write(out, json.dumps(result, indent=1).encode("utf-8"))  # a failed write leaves no temp file
    except CxrError as err:
        raise SystemExit(f"cxr-train compare: {err}") from err
    print(json.dumps({"compare": str(out)}))
    return 0
