"""Train the lung/heart U-Net (Dice loss) on JSRT images with SCR masks and write a segmentation bundle.

    cxr-train segment --data ../shared/data/jsrt --size 160 --width 16 --epochs 10 \
        --out resources/models/segmentation.cxrbundle

Fold ``--fold`` (image-wise, of ``--n-folds``) is held out; Dice per class on it
is measured at full resolution and stored in the bundle provenance. JSRT/SCR
are for research use only, and so are the weights (said in the manifest).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .common import add_train_arguments, command_line, train_config

#: what ``cxr-train segment --help`` says
DESCRIPTION = """Train the lung and heart U-Net (Dice loss) on JSRT images with SCR masks and write a
segmentation bundle. One image-wise fold is held out; its Dice per class, measured at full
resolution, is stored in the bundle. JSRT and SCR are for research use only, and so are the
weights (the manifest says so)."""
EXAMPLES = """  cxr-train segment --data JSRT --size 160 --width 16 --epochs 10 --out models/segmentation.cxrbundle"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="JSRT folder: images/*.jpg and masks/<class>/<stem>.png")
    g.add_argument("--size", type=int, default=160, help="network input size in pixels (default 160)")
    g.add_argument("--fold", type=int, default=0, help="held-out image-wise fold (default 0)")
    g.add_argument("--n-folds", type=int, default=5, help="number of image-wise folds")
    g.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    g.add_argument("--no-augment", action="store_true", help="turn augmentation off")
    m = p.add_argument_group("model")
    m.add_argument("--width", type=int, default=16, help="U-Net base width (default 16)")
    m.add_argument("--depth", type=int, default=4, help="U-Net depth (default 4)")
    m.add_argument("--bce-weight", type=float, default=0.5, help="weight of the BCE term added to Dice")
    m.add_argument("--fp32-bundle", action="store_true", help="store fp32 weights (default fp16)")
    add_train_arguments(p, epochs=10, batch_size=8, lr=2e-3, optimizer="adam")


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.models import create_model

    from ..data.segmentation import SegAugment, SegDataset, load_jsrt_records, split_folds
    from ..trainers.loop import dist_info
    from ..trainers.segment import (evaluate_segmentation, save_segmentation_bundle, segmentation_provenance,
                                    train_segmentation)

    t0 = time.perf_counter()
    records = load_jsrt_records(args.data)
    if args.limit:
        records = records[: args.limit]
    train_r, val_r = split_folds(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed)
    log.info("JSRT: %d train, %d held-out images (fold %d/%d); loading at %d px",
             len(train_r), len(val_r), args.fold, args.n_folds, args.size)
    aug = None if args.no_augment else SegAugment()
    train_ds = SegDataset.from_records(train_r, args.size, augment=aug, seed=args.seed)
    val_ds = SegDataset.from_records(val_r, args.size) if val_r else None
    model = create_model("unet", width=args.width, depth=args.depth)
    model.input_size = int(args.size)
    cfg = train_config(args, arch="unet", width=args.width, depth=args.depth, size=args.size,
                       bce_weight=args.bce_weight, fold=args.fold, n_folds=args.n_folds)
    if args.no_resume:
        (Path(cfg.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    model, history = train_segmentation(model, train_ds, val_ds, cfg, bce_weight=args.bce_weight)
    if dist_info()[0] != 0:
        return 0
    model.eval()
    evaluation = evaluate_segmentation(model, val_r, size=args.size) if val_r else None
    prov = segmentation_provenance(command_line(), cfg, args.data, fold=args.fold, n_folds=args.n_folds,
                                   n_train=len(train_r), n_val=len(val_r), history=history,
                                   evaluation=evaluation, wall_seconds=time.perf_counter() - t0)
    path = save_segmentation_bundle(model, args.out, input_size=args.size, provenance=prov,
                                    half=not args.fp32_bundle)
    print(json.dumps({"bundle": str(path), "heldout": evaluation,
                      "wall_seconds": round(time.perf_counter() - t0, 1)}))
    return 0
