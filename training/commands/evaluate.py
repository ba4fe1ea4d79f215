"""Evaluate model bundles on an NIH-layout folder with the app's pipeline and write the papers' tables.

    cxr-train evaluate --data DIR (--model BUNDLE ... | --models DIR) --out DIR [--fold N|all|-1]
                       [--n-folds 5] [--seed 0] [--method NAME ...] [--predictions-method NAME] [--map-size 512]
                       [--device auto|cpu|cuda]

The bundles get their pipeline roles as in ``cxrviewer analyze``; every held-out study is run
through that pipeline (same preprocessing, alignment, crop, map resolution and boxes) and every
explanation method that proposes boxes is scored (``training/evaluate.py``). Writes
``metrics.json`` and ``tables.md``: AUROC per class; per method, localisation accuracy and AFP at
T(IoU) 0.1..0.7 and T(IoBB) 0.1/0.25/0.5/0.75/0.9 in original pixels under three box budgets (one
box per class, top-3 per class, every proposed box), over the test images that have a
ground-truth box of the class. Beside every method: the location prior learned from the
evaluated fold's TRAINING boxes (always scored, also with --method) and the floor (median
training box per class, pixels). ``cxr-train card`` turns metrics.json into a bundle's model card.
A lone alignment bundle is evaluated instead by its parameter error against the phantom ground
truth and its similarity to the canonical chest. A fold request that cannot be met, or a flag
that would have no effect, is an error (exit code 2).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: what ``cxr-train evaluate --help`` says
DESCRIPTION = """Evaluate model bundles on an NIH-layout folder through the app's own pipeline and write
metrics.json and tables.md to --out, with ROC, precision-recall and calibration curves (PNG, csv,
json) and predictions.csv (per study and class: probability, label, box, IoU). It reports the
AUROC per class and, for every explanation
method that proposes boxes, the localisation accuracy and false positives per image at several
IoU and IoBB thresholds under three box budgets (one box per class, top 3, all boxes), beside
the location prior and the median-box floor. A lone alignment bundle gets alignment metrics
instead. A fold request that cannot be met, or a flag that would have no effect, exits with
status 2."""
EXAMPLES = """  cxr-train evaluate --data NIH --models resources/models --fold 0 --out eval/fold0
  cxr-train evaluate --data NIH --model dm.cxrbundle --fold -1 --out eval/dm"""

log = logging.getLogger(__name__)

#: defaults of the flags whose explicit use is checked (None in the parser = not given)
N_FOLDS, SEED, MAP_SIZE = 5, 0, 512


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


def box_methods() -> list[str]:
    """Every registered explainer that proposes boxes (``proposes_boxes``), the prior included."""
    from cxrviewer.core.explain import get_explainer, list_explainers

    return [n for n in list_explainers() if get_explainer(n).proposes_boxes]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder")
    p.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                   help="a bundle to evaluate (repeatable; roles assigned as in cxrviewer analyze)")
    p.add_argument("--models", default=None, metavar="DIR", help="a folder of *.cxrbundle bundles (as analyze)")
    p.add_argument("--out", required=True, help="folder for metrics.json and tables.md")
    p.add_argument("--fold", type=_fold, default=0, metavar="N|all|-1",
                   help="held-out patient-wise fold N (the floor and the prior from the other folds); 'all': "
                        "every image is a test image and each image's floor and prior come from the boxes of the "
                        "OTHER folds (the same patient-wise split as --fold N); -1: the official test_list.txt "
                        "(error when the folder has no official lists)")
    p.add_argument("--n-folds", type=int, default=None, help=f"patient-wise folds (default {N_FOLDS}, at least 2; "
                   "not with --fold -1)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the patient-wise split (default {SEED}; "
                   "not with --fold -1)")
    methods = box_methods()
    p.add_argument("--method", nargs="+", default=None, choices=methods, metavar="NAME",
                   help="explanation methods to score (default: every one the bundles allow; the prior is always "
                        "scored as the reference): " + ", ".join(methods))
    p.add_argument("--predictions-method", default=None, choices=methods, metavar="NAME",
                   help="the box method whose best box per class and study goes into predictions.csv (default: the "
                        "app's default box method among the scored ones); must be scored")
    p.add_argument("--map-size", type=int, default=None,
                   help=f"longest side of the maps (default {MAP_SIZE}, as analyze)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run the models (auto: the GPU when there is one)")


def _error(msg: str) -> int:
    print(f"cxr-train evaluate: {msg}", file=sys.stderr)
    return 2


def _check_flags(args: argparse.Namespace) -> None:
    """Fold flags that cannot be met or would be ignored raise ``ValueError``; fills the defaults."""
    if args.fold == -1:
        given = [f for f, v in (("--n-folds", args.n_folds), ("--seed", args.seed)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} have no effect with --fold -1 (the official lists)")
    args.n_folds = N_FOLDS if args.n_folds is None else args.n_folds
    args.seed = SEED if args.seed is None else args.seed
    if args.n_folds < 2:
        raise ValueError(f"--n-folds {args.n_folds}: need at least 2 folds (one to test, the others for the "
                         "floor and the prior)")
    if isinstance(args.fold, int) and args.fold >= args.n_folds:
        raise ValueError(f"--fold {args.fold} is not one of 0..{args.n_folds - 1} (--n-folds {args.n_folds})")
    if args.map_size is not None and args.map_size < 1:
        raise ValueError(f"--map-size {args.map_size}: must be positive")
    pm = getattr(args, "predictions_method", None)
    if pm is not None and args.method is not None and pm not in _scored(args.method):
        raise ValueError(f"--predictions-method {pm} is not among the scored methods ({', '.join(_scored(args.method))})")


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


def _roles(bundles: list) -> dict:
    """Pipeline roles as analyze assigns them; a bundle that would be skipped is an error here."""
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.roles import assign_roles

    roles = assign_roles(bundles)
    left = [b.path.name for b in bundles if all(b is not r for r in roles.values())]
    if left:
        raise CxrError(f"no pipeline role left for {', '.join(left)} (two bundles of one role): evaluate them "
                       "in separate runs")
    return roles


def _split(args: argparse.Namespace, records: list) -> tuple[list, list, dict[str, int] | None]:
    """(train, test, fold of every record for --fold all)."""
    from cxrviewer.core.errors import CxrError

    from ..data import official_split, patient_folds

    if args.fold == -1:
        off = official_split(args.data, records)
        if off is None:
            raise CxrError(f"{args.data} has no official train_val_list.txt / test_list.txt (--fold -1 needs "
                           "them; use --fold N or --fold all)")
        train, test, fold_of = off[0], off[1], None
    else:
        folds = patient_folds(records, args.n_folds, args.seed)
        if args.fold == "all":
            train, test, fold_of = [], list(records), {r.key: int(f) for r, f in zip(records, folds)}
            if len(set(fold_of.values())) < 2:
                raise CxrError(f"--fold all needs at least 2 non-empty folds; {len(records)} images of "
                               f"{len({r.patient_id for r in records})} patient(s) fill only one")
        else:
            train = [r for r, f in zip(records, folds) if f != args.fold]
            test = [r for r, f in zip(records, folds) if f == args.fold]
            fold_of = None
    if not test:
        raise CxrError(f"fold {args.fold} holds no images of {args.data} (fewer patients than --n-folds "
                       f"{args.n_folds}?)" if args.fold != -1 else "test_list.txt names none of the images")
    return train, test, fold_of


def _image_size(ref: Any) -> tuple[int, int] | None:
    """(width, height) from the image file's header; None for DICOM or an unreadable header."""
    try:
        from PIL import Image

        with Image.open(ref.path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - DICOM or unreadable header
        return None


def pixel_boxes(ref: Any) -> list:
    """A study reference's ground-truth boxes in its image's pixels (the NIH box frame scaled to
    the image size read from the file header, as ``StudyRef.load`` scales them)."""
    boxes = list(ref.gt_boxes)
    frame = int(ref.extra.get("box_frame") or 0)
    if not boxes or not frame:
        return boxes
    size = _image_size(ref)
    return boxes if size is None or size == (frame, frame) else [b.scaled(size[0] / frame, size[1] / frame)
                                                                 for b in boxes]


def fraction_boxes(ref: Any) -> list:
    """The ground-truth boxes as fractions of the image (the prior's frame): divided by the box
    frame (NIH: 1024), else by the image size (boxes of an image of unknown size are left out)."""
    boxes = list(ref.gt_boxes)
    frame = int(ref.extra.get("box_frame") or 0)
    size = (frame, frame) if frame else (_image_size(ref) if boxes else None)
    if not boxes or size is None:
        return []
    return [b.scaled(1.0 / size[0], 1.0 / size[1]) for b in boxes]


def _train_boxes(boxes_of: Callable[[Any], list], refs: dict, train: list, test: list,
                 fold_of: dict[str, int] | None) -> Any:
    """Training boxes (``boxes_of(ref)``) for the floor or the prior: the training records', or
    with ``--fold all`` per test image the boxes of the other folds."""
    if fold_of is None:
        return [b for r in train for b in boxes_of(refs[r.key])]
    by_fold: dict[int, list] = {}
    for r in test:
        by_fold.setdefault(fold_of[r.key], []).extend(boxes_of(refs[r.key]))
    other = {f: [b for g, bs in by_fold.items() if g != f for b in bs] for f in by_fold}
    return {r.key: other[fold_of[r.key]] for r in test}


def _references(args: argparse.Namespace, refs: dict, train: list, test: list,
                fold_of: dict[str, int] | None) -> dict[str, Any]:
    """``evaluate_pipeline`` keywords of the floor and the fold's prior, and their JSON labels."""
    if fold_of is not None:
        where = "the other folds' boxes, per image"
    elif args.fold == -1:
        where = "train_val_list.txt's boxes"
    else:
        where = f"the training folds' boxes (all but fold {args.fold} of {args.n_folds})"
    floor = _train_boxes(pixel_boxes, refs, train, test, fold_of)
    prior = _train_boxes(fraction_boxes, refs, train, test, fold_of)
    return {"kw": {"train_boxes": floor, "prior_boxes": prior, "prior_title": f"prior (median box of {where})"},
            "json": {"floor_source": f"median box of {where}, pixels" if floor else "none: the training images "
                     "have no boxes", "prior_source": f"median box of {where}, fractions of the image" if prior
                     else "no training boxes: the bundle's own or the shipped prior (see its title)"}}


def _evaluate_alignment(bundle: Any, args: argparse.Namespace, test: list) -> int:
    from ..trainers.align import evaluate_alignment

    for flag, value in (("--method", args.method), ("--map-size", args.map_size),
                        ("--predictions-method", getattr(args, "predictions_method", None))):
        if value is not None:
            return _error(f"{flag} has no effect on a lone alignment bundle (it is scored by its parameter error)")
    result = evaluate_alignment(bundle, test, data_dir=args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def _setup(args: argparse.Namespace) -> tuple[list, list, dict | None, Any]:
    """(train, test, fold_of, pipeline or the lone alignment bundle); raises on a bad request."""
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import select_device
    from cxrviewer.core.pipeline import Pipeline

    from ..data import load_records
    from ..evaluate import scored_explainers

    _check_flags(args)
    paths = _bundle_paths(args)
    records = load_records(args.data)
    train, test, fold_of = _split(args, records)
    dev = select_device(args.device)
    bundles = [load_bundle(p, device=dev.device) for p in paths]
    if len(bundles) == 1 and bundles[0].manifest.family == "alignment":
        return train, test, fold_of, bundles[0]
    pipeline = Pipeline(_roles(bundles), dev, map_max_side=args.map_size or MAP_SIZE,
                        methods=_pipeline_methods(_scored(args.method)))
    scored_explainers(pipeline, _scored(args.method))  # a method the bundles cannot run is an error up front
    return train, test, fold_of, pipeline


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.io import read_nih_folder
    from cxrviewer.core.pipeline import Pipeline

    from ..evaluate import evaluate_pipeline, write_report

    try:
        train, test, fold_of, pipeline = _setup(args)
    except (CxrError, FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    if not isinstance(pipeline, Pipeline):
        return _evaluate_alignment(pipeline, args, test)
    refs = {r.key: r for r in read_nih_folder(args.data)}
    ref = _references(args, refs, train, test, fold_of)
    try:
        result = evaluate_pipeline(pipeline, [refs[r.key] for r in test], methods=_scored(args.method),
                                   progress=_progress, predictions_method=getattr(args, "predictions_method", None),
                                   **ref["kw"])
    except ValueError as exc:  # a --predictions-method the loaded bundles cannot run
        return _error(str(exc))
    result.update({"models": {role: {**b.manifest.summary(), "bundle": b.path.name}
                              for role, b in pipeline.bundles.items()},
                   "data": str(args.data), "fold": args.fold,
                   "n_folds": None if args.fold == -1 else args.n_folds,
                   "seed": None if args.fold == -1 else args.seed, "map_size": pipeline.map_max_side,
                   "device": str(pipeline.device), **ref["json"],
                   "command": "cxr-train " + shlex.join(getattr(args, "argv", None) or sys.argv[1:]),
                   "config": dict(getattr(args, "resolved_config", None) or {}),  # (--config reproduces it)
                   "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    names = ", ".join(b.path.name for b in pipeline.bundles.values())
    j, m = write_report(result, args.out, title=f"{names} on {args.data} (fold {args.fold})")
    print(json.dumps({"metrics": str(j), "tables": str(m), "mean_auroc": result.get("mean_auroc"),
                      "methods": list(result["methods"]), "predictions_method": result.get("predictions_method"),
                      "outputs": json.loads(j.read_text(encoding="utf-8")).get("outputs", []),
                      "failed": len(result.get("failed", []))}))
    return 1 if result.get("failed") else 0


def _scored(methods: Sequence[str] | None) -> list[str] | None:
    """The requested methods plus the prior, the reference every table and card compares with."""
    return None if methods is None else list(dict.fromkeys([*methods, "prior"]))


def _pipeline_methods(methods: Sequence[str] | None) -> list[str] | None:
    """Every registered explainer except the box methods not asked for (the others, alignment
    and segmentation, shape what the scored ones see). When no method asked for uses the
    classifier (``--method prior``), the first one that does runs too, unscored: its stage is the
    classifier's one forward, which gives the probabilities of the AUROC as the app computes them."""
    if methods is None:
        return None
    from cxrviewer.core.explain import get_explainer, list_explainers

    names = list_explainers()
    keep = [n for n in names if n in methods or not get_explainer(n).proposes_boxes]
    if not any("classifier" in get_explainer(n).requires for n in keep):
        keep += [n for n in names if "classifier" in get_explainer(n).requires][:1]
    return keep


def _progress(i: int, n: int, key: str) -> None:
    if i == n or i % 50 == 0:
        log.info("evaluated %d/%d studies (%s)", i, n, key)
