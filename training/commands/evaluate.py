"""Evaluate model bundles on an NIH-layout folder with the app's pipeline and write the papers' tables.

    cxr-train evaluate --data DIR (--model BUNDLE ... | --models DIR) --out DIR [--fold N|all|-1]
                       [--method NAME ...] [--map-size 512] [--device auto|cpu|cuda]

The bundles get their pipeline roles as in ``cxrviewer analyze``; every held-out study is run
through that pipeline (same preprocessing, alignment, crop, map resolution and boxes) and every
registered explanation method with a box rule is scored (``training/evaluate.py``). Writes
``metrics.json`` and ``tables.md``: AUROC per class; per method, localisation accuracy and AFP
at T(IoU) 0.1..0.7 and T(IoBB) 0.1/0.25/0.5/0.75/0.9 in original pixels, with the floor (median
training box per class) beside it. A lone alignment bundle is evaluated instead by its
parameter error against the phantom ground truth and its similarity to the canonical chest.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _fold(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number, -1 or 'all', not {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError("folds are 0.., -1 (official test list) or 'all'")
    return value


def _box_methods() -> list[str]:
    from cxrviewer.core.explain import get_explainer, list_explainers

    return [n for n in list_explainers() if get_explainer(n).box_rule is not None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder")
    p.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                   help="a bundle to evaluate (repeatable; roles assigned as in cxrviewer analyze)")
    p.add_argument("--models", default=None, metavar="DIR", help="a folder of *.cxrbundle bundles (as analyze)")
    p.add_argument("--out", required=True, help="folder for metrics.json and tables.md")
    p.add_argument("--fold", type=_fold, default=0, metavar="N|all|-1",
                   help="held-out patient-wise fold N (the floor from the other folds); 'all': every image is "
                        "a test image and each image's floor comes from the boxes of the OTHER folds (the same "
                        "patient-wise split as --fold N, so no image's own box is in its floor); -1: the "
                        "official test_list.txt (error when the folder has no official lists)")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split")
    p.add_argument("--method", nargs="+", default=None, choices=_box_methods(), metavar="NAME",
                   help="explanation methods to score (default: every one the bundles allow): "
                        + ", ".join(_box_methods()))
    p.add_argument("--map-size", type=int, default=512, help="longest side of the maps (default 512, as analyze)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _error(msg: str) -> int:
    print(f"cxr-train evaluate: {msg}", file=sys.stderr)
    return 2


def _bundle_paths(args: argparse.Namespace) -> list[Path]:
    from cxrviewer.core.bundle import find_bundles
    from cxrviewer.core.errors import BundleError

    paths: list[Path] = []
    for m in args.model:
        found = find_bundles(m)
        if found != [Path(m)]:
            raise BundleError("not a model bundle (no manifest.json)", path=str(m))
        paths += found
    if args.models:
        found = find_bundles(args.models)
        if not found:
            raise BundleError(f"no model bundles (*.cxrbundle) in {args.models}")
        paths += found
    if not paths:
        raise BundleError("give --model BUNDLE and/or --models DIR")
    return list(dict.fromkeys(paths))


def _split(args: argparse.Namespace, records: list) -> tuple[list, list, dict[str, int] | None]:
    """(train, test, fold of every record for --fold all)."""
    from cxrviewer.core.errors import CxrError

    from ..data import official_split, patient_folds

    if args.fold == -1:
        off = official_split(args.data, records)
        if off is None:
            raise CxrError(f"{args.data} has no official train_val_list.txt / test_list.txt (--fold -1 needs "
                           "them; use --fold N or --fold all)")
        return off[0], off[1], None
    folds = patient_folds(records, args.n_folds, args.seed)
    if args.fold == "all":
        return [], list(records), {r.key: int(f) for r, f in zip(records, folds)}
    if not 0 <= args.fold < args.n_folds:
        raise CxrError(f"--fold {args.fold} is not one of 0..{args.n_folds - 1}")
    return ([r for r, f in zip(records, folds) if f != args.fold],
            [r for r, f in zip(records, folds) if f == args.fold], None)


def _pixel_boxes(ref: Any) -> list:
    """A study reference's ground-truth boxes in its image's pixels (the NIH box frame scaled to
    the image size read from the file header, as ``StudyRef.load`` scales them)."""
    boxes = list(ref.gt_boxes)
    frame = int(ref.extra.get("box_frame") or 0)
    if not boxes or not frame:
        return boxes
    try:
        from PIL import Image

        with Image.open(ref.path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - DICOM or unreadable header: the boxes stay in the box frame
        return boxes
    return boxes if (w, h) == (frame, frame) else [b.scaled(w / frame, h / frame) for b in boxes]


def _floor_boxes(refs: dict, train: list, test: list, fold_of: dict[str, int] | None) -> Any:
    """The floor's training boxes: the training records', or with ``--fold all`` per test image
    the boxes of the other folds."""
    if fold_of is None:
        return [b for r in train for b in _pixel_boxes(refs[r.key])]
    by_fold: dict[int, list] = {}
    for r in test:
        by_fold.setdefault(fold_of[r.key], []).extend(_pixel_boxes(refs[r.key]))
    other = {f: [b for g, bs in by_fold.items() if g != f for b in bs] for f in by_fold}
    return {r.key: other[fold_of[r.key]] for r in test}


def _evaluate_alignment(bundle: Any, args: argparse.Namespace, test: list) -> int:
    from ..trainers.align import evaluate_alignment

    result = evaluate_alignment(bundle, test, data_dir=args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import select_device
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.io import read_nih_folder
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.roles import assign_roles

    from ..data import load_records
    from ..evaluate import evaluate_pipeline, scored_explainers, write_report

    try:
        dev = select_device(args.device)
        bundles = [load_bundle(p, device=dev.device) for p in _bundle_paths(args)]
        records = load_records(args.data)
        train, test, fold_of = _split(args, records)
        if len(bundles) == 1 and bundles[0].manifest.family == "alignment":
            return _evaluate_alignment(bundles[0], args, test)
        pipeline = Pipeline(assign_roles(bundles), dev, map_max_side=args.map_size,
                            methods=_pipeline_methods(args.method))
        scored_explainers(pipeline, args.method)  # a method the bundles cannot run is an error up front
    except (CxrError, FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    refs = {r.key: r for r in read_nih_folder(args.data)}
    result = evaluate_pipeline(pipeline, [refs[r.key] for r in test], methods=args.method,
                               train_boxes=_floor_boxes(refs, train, test, fold_of), progress=_progress)
    result.update({"models": {role: {**b.manifest.summary(), "bundle": b.path.name}
                              for role, b in pipeline.bundles.items()},
                   "data": str(args.data), "fold": args.fold, "n_folds": args.n_folds, "seed": args.seed,
                   "map_size": args.map_size, "device": str(pipeline.device),
                   "floor": "median box of the other folds per image" if fold_of is not None
                   else "median training box"})
    names = ", ".join(b.path.name for b in pipeline.bundles.values())
    j, m = write_report(result, args.out, title=f"{names} on {args.data} (fold {args.fold})")
    print(json.dumps({"metrics": str(j), "tables": str(m), "mean_auroc": result.get("mean_auroc"),
                      "methods": list(result["methods"]), "failed": len(result.get("failed", []))}))
    return 1 if result.get("failed") else 0


def _pipeline_methods(methods: Sequence[str] | None) -> list[str] | None:
    """Every registered explainer except the box methods not asked for (the others, alignment
    and segmentation, shape what the scored ones see)."""
    if methods is None:
        return None
    from cxrviewer.core.explain import get_explainer, list_explainers

    return [n for n in list_explainers() if n in methods or get_explainer(n).box_rule is None]


def _progress(i: int, n: int, key: str) -> None:
    if i == n or i % 50 == 0:
        log.info("evaluated %d/%d studies (%s)", i, n, key)
