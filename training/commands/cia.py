"""Train CIA-Net with limited box supervision (cia-net Eq. 4-6) and write a bundle with its normal bank.

    cxr-train cia --data DIR --out models/cia --box-fraction 0.4 --negatives paired
    cxr-train cia --data DIR --annotations project.cxrannot --out models/cia   (boxes/labels from a store)

Defaults follow the paper (Sec. 4.1): ResNet-50, 512 px, SGD Nesterov lr 1e-3 / 10 every 5 epochs,
momentum 0.9, weight decay 1e-4, 15 epochs, batch 6. ``--optimizer adam`` for small CPU runs.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import (add_data_arguments, add_init_weights_argument, add_train_arguments, command_line, datasets,
                     init_normalisation, init_provenance, init_weights, parse_kwargs, train_config)

#: what ``cxr-train cia --help`` says
DESCRIPTION = """Train CIA-Net (contrast-induced attention) with limited box supervision and write a bundle
that includes its bank of normal images for pairing. --box-fraction sets the share of boxed
images whose boxes are used; --annotations adds the labels and accepted boxes of an
annotation project. The defaults follow the paper (ResNet-50, 512 px, SGD lr 1e-3 divided by
10 every 5 epochs, weight decay 1e-4, 15 epochs, batch 6); use --optimizer adam for small CPU
runs. --init-weights starts both backbones from a model you have (a classifier of ours or an
imported one with the same backbone)."""
EXAMPLES = """  cxr-train cia --data NIH --box-fraction 0.4 --negatives paired --out models/cia.cxrbundle
  cxr-train cia --data NIH --annotations project.cxrann --out models/cia.cxrbundle
  cxr-train cia --data NIH --annotations project.cxrann --backbone densenet121 \
      --init-weights imported.cxrbundle --out models/cia_ft.cxrbundle"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..trainers.cia import NEGATIVE_MODES

    p.add_argument("--backbone", default="resnet50", help="resnet18|resnet34|resnet50|densenet121|tiny")
    p.add_argument("--arch-kwargs", default=None, help='extra JSON kwargs of "cia", e.g. \'{"head_channels": 256}\'')
    p.add_argument("--box-fraction", type=float, default=0.4,
                   help="share of the boxed training images whose boxes are used (0, 0.4, 0.8 in the paper; "
                        "chosen deterministically by --seed)")
    p.add_argument("--negatives", choices=NEGATIVE_MODES, default="paired",
                   help="paired: nearest normal by 16x16 hash code (the paper); random; canonical chest")
    p.add_argument("--canonical", default=None,
                   help="canonical chest PNG for --negatives canonical (default resources/canonical_chest.png, "
                        "else the mean training normal)")
    p.add_argument("--annotations", default=None,
                   help="annotation project (.cxrann): its labels and accepted boxes override the CSVs "
                        "for the images it knows; its other images with a readable path are added")
    p.add_argument("--annotation-status", default=None,
                   help="only studies with these review statuses, comma-separated (e.g. done,verified)")
    p.add_argument("--beta-b", type=float, default=5.0, help="weight beta_B of the box loss (Eq. 6)")
    p.add_argument("--bank-size", type=int, default=64, help="normal images stored in the bundle for pairing")
    p.add_argument("--prior", type=float, default=0.01,
                   help="initial cell probability of the head (bias init; 0 = keep the model's init; "
                        "not applied when --init-weights gives the head)")
    add_init_weights_argument(p, "Reused: the backbone, for both the feature branch and the attention "
                                 "branch's encoder (--backbone must be the bundle's); the attention conv and "
                                 "grid head only from a CIA-Net bundle with the same classes")
    add_data_arguments(p)
    add_train_arguments(p, epochs=15, batch_size=6, lr=1e-3, optimizer="sgd")
    p.set_defaults(size=512, weight_decay=1e-4, lr_step_epochs=5)


def merge_annotations(records: list, store_path: str | Path, *, status: list[str] | None = None) -> list:
    """Records with the store's labels and boxes applied (see ``--annotations``).

    Matched by file stem (the NIH key). Labels: present -> 1, absent -> 0; uncertain keeps the
    CSV label (a new image: 0). A box of a class implies the class is present. A store study
    with accepted boxes replaces the CSV boxes of that image.
    """
    import numpy as np

    from cxrviewer.core.annotations import AnnotationStore, iter_training_records
    from cxrviewer.core.classes import CLASSES, canonical

    from ..data import Record

    by_key = {r.key: r for r in records}
    out = list(records)
    n_upd = n_new = 0
    with AnnotationStore(store_path, read_only=True) as store:
        for tr in iter_training_records(store, status=status):
            key = Path(tr.identity.file_name or (tr.path or "")).stem
            rec = by_key.get(key)
            if rec is None:
                if not tr.path or not Path(tr.path).is_file() or not (tr.labels or tr.boxes):
                    continue
                rec = Record(Path(tr.path), key, np.zeros(len(CLASSES), np.float32), [], f"annotations:{key}")
                by_key[key] = rec
                out.append(rec)
                n_new += 1
            else:
                n_upd += 1
            labels = rec.labels.copy()
            for name, v in tr.labels.items():
                try:
                    c = CLASSES.index(canonical(name))
                except KeyError:
                    continue
                if v in (0, 1):
                    labels[c] = float(v)
            for b in tr.boxes:
                if b.label in CLASSES:
                    labels[CLASSES.index(b.label)] = 1.0
            rec.labels = labels
            if tr.boxes:
                rec.boxes = list(tr.boxes)
    log.info("annotations %s: %d images updated, %d added", store_path, n_upd, n_new)
    return out


def _datasets(args: argparse.Namespace):
    if not args.annotations:
        return datasets(args)
    from ..data import AugmentConfig, ChestDataset, load_records, split_records

    if args.cache:
        raise SystemExit("--annotations cannot be combined with --cache (the cache holds the CSV boxes)")
    status = [s.strip() for s in args.annotation_status.split(",")] if args.annotation_status else None
    records = merge_annotations(load_records(args.data), args.annotations, status=status)
    if args.limit:
        records = records[: args.limit]
    try:
        train_r, val_r = split_records(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed,
                                       folder=args.data)
    except ValueError as exc:
        raise SystemExit(f"cxr-train: {exc}") from None
    aug = None if args.no_augment else AugmentConfig()
    return (records, ChestDataset(train_r, args.size, augment_cfg=aug, seed=args.seed),
            ChestDataset(val_r, args.size, seed=args.seed), train_r, val_r)


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import save_bundle
    from cxrviewer.core.classes import CLASSES
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.models import create_model

    from ..data import dataset_preprocess
    from ..trainers.classify import provenance
    from ..trainers.cia import train_cia
    from ..trainers.loop import dist_info

    if getattr(args, "align", None) and args.negatives == "canonical":
        raise SystemExit("--negatives canonical pairs with the canonical lung crop, but --align trains on the "
                         "models' frame (the whole registered chest): use --negatives paired or random "
                         "(aligned training normals, the bank the app pairs with)")
    kwargs = {"backbone": args.backbone, **parse_kwargs(args.arch_kwargs)}
    import torch

    torch.manual_seed(args.seed)  # --seed seeds the weights too
    model = create_model("cia", **kwargs)
    init = init_weights(args, model)
    _, train_ds, val_ds, train_r, val_r = _datasets(args)
    init_normalisation(init, train_ds, val_ds)
    cfg = train_config(args, arch=model.arch, box_fraction=args.box_fraction, negatives=args.negatives,
                       beta_b=args.beta_b)
    if args.no_resume:
        (Path(cfg.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    try:
        model, history, extras, info = train_cia(
            model, train_ds, val_ds, cfg, box_fraction=args.box_fraction, negatives=args.negatives,
            beta_b=args.beta_b, bank_size=args.bank_size, canonical_path=args.canonical,
            prior=None if (init is not None and init.head_loaded) else (args.prior or None))
    except CxrError as err:
        raise SystemExit(str(err)) from err
    if dist_info()[0] != 0:
        return 0
    prov = provenance(command_line(), cfg, args.data, history, fold=args.fold, n_folds=args.n_folds,
                      n_train=len(train_r), n_val=len(val_r), annotations=args.annotations,
                      cia={k: v for k, v in info.items() if k != "normal_bank"}, research_demo=True,
                      cache_alignment=getattr(train_ds, "alignment", None), **init_provenance(init))
    extras_info = {"normal_bank": info.get("normal_bank", {})}
    path = save_bundle(model.cpu(), args.out, classes=list(CLASSES), input_size=args.size,
                       normalisation=dataset_preprocess(train_ds).to_manifest()["normalisation"], role="cia",
                       provenance=prov, extras=extras,
                       extras_info=extras_info, overwrite=True,
                       description=f"CIA-Net ({args.backbone}), {args.box_fraction:.0%} boxes, "
                                   f"{args.negatives} negatives")
    final = history[-1].get("metrics", {}) if history else {}
    print(json.dumps({"bundle": str(path), "mean_auroc": final.get("mean_auroc"),
                      "loc_iou_0.3": final.get("loc_iou_0.3")}))
    return 0
