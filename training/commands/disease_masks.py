"""Disease masks (M1): psi from a trained classifier's CAMs (disease-masks Eq. 2-3), then retrain
with f' = psi*f + f (Eq. 4-5) and write a "dm" bundle (psi also stored as the extra "disease_masks").

    cxr-train disease-masks --data DIR --classifier cls.cxrbundle [--alignment align.cxrbundle] \
        --size 512 --epochs 5 --out resources/models/dm.cxrbundle
    cxr-train disease-masks ... --pseudo [--segmentation seg.cxrbundle]   (PDM from anatomy, Sec. 4.4)
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import add_data_arguments, add_train_arguments, command_line, datasets, train_config

#: what ``cxr-train disease-masks --help`` says
DESCRIPTION = """Train the disease-masks model: build per-class disease masks from a trained classifier's
class activation maps, then retrain the classifier guided by them, and write a "dm" bundle that
also stores the masks. With --pseudo the masks come from the lung and heart anatomy instead
(for comparison)."""
EXAMPLES = """  cxr-train disease-masks --data NIH --classifier cls.cxrbundle --alignment align.cxrbundle \
      --size 512 --epochs 5 --out models/dm.cxrbundle"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("disease masks")
    g.add_argument("--classifier", required=True, help="trained cam_classifier bundle (same backbone for the dm model)")
    g.add_argument("--alignment", default=None, help="alignment bundle: masks and retraining on aligned images")
    g.add_argument("--min-prob", type=float, default=0.8, help="keep images with P_c >= this (Eq. 2; default 0.8)")
    g.add_argument("--threshold", type=float, default=0.5, help="threshold T of Eq. 3 on the mean map (default 0.5)")
    g.add_argument("--soft", action="store_true", help="keep the mean map above T instead of 0/1 masks")
    g.add_argument("--require-label", action="store_true",
                   help="also require a positive label (not in the paper)")
    g.add_argument("--pseudo", action="store_true",
                   help="pseudo disease masks from anatomy instead of Eq. 3 (for comparison)")
    g.add_argument("--segmentation", default=None,
                   help="with --pseudo: segmentation bundle for the lungs/heart (default: the data's masks/ folder)")
    add_data_arguments(p)
    add_train_arguments(p)


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import load_bundle

    from ..data.labels import is_nih14
    from ..trainers.classify import provenance
    from ..trainers.disease_masks import (align_dataset, anatomy_from_folder, anatomy_from_segmentation,
                                          save_dm_bundle, train_disease_masks)
    from ..trainers.loop import dist_info, held_record

    clf = load_bundle(args.classifier)
    if clf.manifest.family != "classifier":
        raise SystemExit(f"{args.classifier} is not a classifier bundle")
    if not is_nih14(clf.manifest.classes):
        ls = clf.manifest.labels
        raise SystemExit(f"cxr-train disease-masks: {args.classifier} has {len(clf.manifest.classes)} classes"
                         f"{f' ({ls.display_name})' if ls else ''}; disease masks are trained on an NIH folder's "
                         f"14 classes (their symmetric classes and anatomy priors are NIH's): give an NIH-14 "
                         f"classifier")
    if tuple(clf.manifest.input_size) != (args.size, args.size):
        log.warning("classifier bundle was trained at %s px; --size is %d", clf.manifest.input_size, args.size)
    classifier = clf.model
    classifier.requires_grad_(True)
    _, train_ds, val_ds, train_r, val_r = datasets(args)
    aligned = None
    if args.alignment and getattr(args, "align", None):
        raise SystemExit("--align (an aligned cache) already holds aligned images; drop --alignment")
    if args.alignment:
        al = load_bundle(args.alignment)
        train_ds = aligned = align_dataset(train_ds, al, batch_size=args.batch_size)
        val_ds = align_dataset(val_ds, al, batch_size=args.batch_size)
    pseudo = None
    if args.pseudo:
        if args.segmentation:
            pseudo = anatomy_from_segmentation(load_bundle(args.segmentation), train_ds, batch_size=args.batch_size)
        else:
            pseudo = anatomy_from_folder(train_r, args.size)
    warp = aligned.warp_image if (aligned is not None and pseudo is not None and not args.segmentation) else None
    cfg = train_config(args, arch="dm", classifier=str(args.classifier), alignment=args.alignment,
                       pseudo=bool(args.pseudo))
    if args.no_resume:
        (Path(cfg.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    res = train_disease_masks(classifier, train_ds, val_ds, cfg, pseudo=pseudo, pseudo_warp=warp,
                              min_prob=args.min_prob, threshold=args.threshold, require_label=args.require_label,
                              binary=not args.soft)
    if dist_info()[0] == 0:
        prov = provenance(command_line(), cfg, args.data, res.history, fold=args.fold, n_folds=args.n_folds,
                          n_train=len(train_r), n_val=len(val_r), classifier=str(args.classifier),
                          alignment=args.alignment, before_retraining=res.before.get("mean_auroc"))
        path = save_dm_bundle(res, args.out, input_size=args.size, provenance=prov)
        final = held_record(res.history, cfg).get("metrics", {})  # the epoch the bundle holds
        print(json.dumps({"bundle": str(path), "source": res.source, "images_per_class": res.counts,
                          "mean_auroc_before": res.before.get("mean_auroc"),
                          "mean_auroc": final.get("mean_auroc")}))
    return 0
