"""Learn the anatomy-guided localiser (the app's default box method) from an NIH-layout folder.

    cxr-train localiser --data DIR --models DIR --out resources/priors/anatomy_localiser.json
                        [--fold-models 'CV/fold{k}' --n-folds 5 --seed 0] [--map-size 256]

Every study is run through the app's pipeline (alignment, lung/heart segmentation, the classifier's
CAM, the ``anatomy`` explainer's evidence) with the bundles of ``--models``; with
``--fold-models`` (a folder pattern with ``{k}``) each study is run with the models of its own
held-out patient-wise fold instead, so the CAM evidence and the probabilities used for calibration
come from a classifier that never saw the study (what the app meets on a new image). Templates and
side models are learned from the studies with boxes; calibration (Platt, for the classifier of
``--models``, identified by its weights' SHA-256) from every study. See training/localiser.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

#: what ``cxr-train localiser --help`` says
DESCRIPTION = """Learn the anatomy-guided localiser, the app's default box method, from an NIH-layout folder
and write it as JSON. Every study is run through the app's pipeline with the bundles of
--models; with --fold-models each study is run with the models of its own held-out fold, so
the evidence comes from a classifier that never saw it."""
EXAMPLES = """  cxr-train localiser --data NIH --models resources/models --fold-models 'CV/fold{k}' \
      --out resources/priors/anatomy_localiser.json"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder (images, Data_Entry, BBox_List)")
    p.add_argument("--models", required=True, metavar="DIR",
                   help="the models folder the localiser is for (its classifier's calibration is stored)")
    p.add_argument("--fold-models", default=None, metavar="PATTERN",
                   help="models folder of each held-out fold, '{k}' replaced by the fold number")
    p.add_argument("--n-folds", type=int, default=5, help="patient-wise folds of --fold-models (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split (default 0)")
    p.add_argument("--map-size", type=int, default=256, help="longest side of the maps (default 256)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run the models (auto: the GPU when there is one)")
    p.add_argument("--out", required=True, help="the localiser JSON to write")


def pipelines(args: argparse.Namespace, records: list) -> tuple[Any, dict[str, Any]]:
    """``pipeline_for(ref)`` and the pipeline of ``--models``; with ``--fold-models`` each study gets
    its held-out fold's pipeline."""
    from cxrviewer.core.bundle import find_bundles, load_bundle
    from cxrviewer.core.device import select_device
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.roles import assign_roles

    from ..data import patient_folds

    dev = select_device(args.device)
    methods = ["alignment", "segmentation", "cam", "anatomy"]

    def make(folder: str) -> Any:
        paths = [p for p in find_bundles(folder)]
        if not paths:
            raise CxrError(f"no model bundles (*.cxrbundle) in {folder}")
        roles = assign_roles([load_bundle(p, device=dev.device) for p in paths])
        if "segmentation" not in roles:
            raise CxrError(f"{folder} has no segmentation bundle: the localiser needs the lung/heart masks")
        return Pipeline(roles, dev, map_max_side=args.map_size, methods=methods, options={"anatomy_model": {}})

    main = make(args.models)
    if not args.fold_models:
        return (lambda ref: main), {"main": main}
    if "{k}" not in args.fold_models or args.n_folds < 2:
        raise CxrError("--fold-models needs '{k}' in the pattern and --n-folds >= 2")
    per_fold = {k: make(args.fold_models.replace("{k}", str(k))) for k in range(args.n_folds)}
    fold_of = {r.key: int(f) for r, f in zip(records, patient_folds(records, args.n_folds, args.seed))}
    return (lambda ref: per_fold[fold_of[ref.key]]), {"main": main, **{f"fold{k}": p for k, p in per_fold.items()}}


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.io import read_nih_folder

    from ..data import load_records
    from ..localiser import collect_evidence, fit_localiser

    try:
        records = load_records(args.data)
        pipeline_for, pipes = pipelines(args, records)
    except (CxrError, FileNotFoundError, ValueError) as exc:
        print(f"cxr-train localiser: {exc}", file=sys.stderr)
        return 2
    refs = read_nih_folder(args.data)
    samples = collect_evidence(pipeline_for, refs, progress=_progress)
    boxed = [s for s in samples if s.boxes]
    if not boxed:
        print(f"cxr-train localiser: no study of {args.data} has boxes to learn from", file=sys.stderr)
        return 2
    clf = pipes["main"].bundles.get("classifier")
    model = fit_localiser(boxed, calibration=samples if args.fold_models else None,
                          classifier_sha256=clf.manifest.weights_sha256 if clf else None,
                          provenance={"command": "cxr-train localiser " + " ".join(getattr(args, "argv", [])),
                                      "config": getattr(args, "resolved_config", None),
                                      "data": str(args.data), "models": str(args.models),
                                      "fold_models": args.fold_models, "n_boxed": len(boxed)})
    _write_json(Path(args.out), model)
    print(json.dumps({"out": str(args.out), "classes": list(model["classes"]), "n_studies": len(samples),
                      "n_boxed": len(boxed), "calibrated": model["calibration"] is not None}))
    return 0


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (a temporary file beside it, renamed into place; the old file kept on error)."""
    from cxrviewer.core.annotations.export import atomic_write

    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _progress(i: int, n: int, key: str) -> None:
    if i == n or i % 100 == 0:
        log.info("localiser evidence %d/%d studies (%s)", i, n, key)
