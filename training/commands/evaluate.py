"""Evaluate a bundle on an NIH-layout folder and write the papers' tables.

    cxr-train evaluate --data DIR --model BUNDLE --out DIR [--fold 0] [--method cam|am|gradcam]

Writes ``metrics.json`` and ``tables.md``: AUROC per class; localisation accuracy
and AFP at T(IoU) 0.1..0.7 and T(IoBB) 0.1/0.25/0.5/0.75/0.9 with the floor
(median training box) beside it. Alignment bundles: parameter error against
phantom ground truth and similarity to the canonical chest before/after.
"""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder")
    p.add_argument("--model", required=True, help="bundle to evaluate")
    p.add_argument("--out", required=True, help="folder for metrics.json and tables.md")
    p.add_argument("--fold", type=int, default=0, help="held-out fold evaluated (-1: official test list; "
                   "-2: every image)")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split")
    p.add_argument("--method", default=None, choices=["cam", "am", "gradcam", "cia"],
                   help="how boxes are proposed (default: am for MSA models, cia for CIA, else cam)")
    p.add_argument("--cache", default=None, help="HDF5 cache to read images from (optional)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import select_device

    from ..data import ChestDataset, load_records, split_records
    from ..evaluate import evaluate_model, write_report

    dev = select_device(args.device)
    b = load_bundle(args.model, device=dev.device)
    records = load_records(args.data)
    if args.fold == -2:
        train_r, test_r = [], records
    else:
        train_r, test_r = split_records(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed,
                                        folder=args.data)
    size = b.manifest.input_size[0]
    if b.manifest.family == "alignment":
        from ..trainers.align import evaluate_alignment

        result = evaluate_alignment(b, test_r, data_dir=args.data)
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return 0
    method = args.method or ("cia" if b.manifest.family == "cia" else
                             "am" if b.manifest.architecture == "msa" else "cam")
    ds = ChestDataset(test_r, size, normalisation=b.manifest.normalisation.get("kind", "minus1_1"))
    negatives = None
    if method == "cia":
        from ..trainers.cia import bank_negatives

        negatives = bank_negatives(b, ds)
    result = evaluate_model(b.model, ds, method=method, train_boxes=_train_boxes_in_input_space(train_r, size),
                            negatives=negatives)
    result["model"] = b.manifest.summary()
    result["data"] = str(args.data)
    result["fold"] = args.fold
    j, m = write_report(result, args.out, title=f"{b.name} on {args.data} (fold {args.fold})")
    print(json.dumps({"metrics": str(j), "tables": str(m), "mean_auroc": result.get("mean_auroc")}))
    return 0


def _train_boxes_in_input_space(records, size: int):
    """Training boxes scaled to the input size (each image's own original size)."""
    from PIL import Image

    out = []
    for r in records:
        if not r.boxes:
            continue
        try:
            with Image.open(r.path) as im:
                w, h = im.size
        except Exception:  # DICOM or unreadable: assume the NIH 1024 px space
            w = h = 1024
        out += [bx.scaled(size / w, size / h) for bx in r.boxes]
    return out
