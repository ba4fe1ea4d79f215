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

from .common import (add_data_arguments, add_init_weights_argument, add_train_arguments, command_line,
                     init_normalisation, init_provenance, init_weights, labelled_datasets, model_kwargs,
                     train_config)

#: what ``cxr-train cia --help`` says
DESCRIPTION = """Train CIA-Net (contrast-induced attention) with limited box supervision and write a bundle
that includes its bank of normal images for pairing. --box-fraction sets the share of boxed
images whose boxes are used; --annotations adds the labels and accepted boxes of an
annotation project and trains its label set (any set: NIH 14, VinDr-CXR, torchxrayvision,
yours; --data is then optional); --label-set NAME|FILE maps a folder's NIH labels onto another
set. The defaults follow the paper (ResNet-50, 512 px, SGD lr 1e-3 divided by 10 every 5
epochs, weight decay 1e-4, 15 epochs, batch 6); use --optimizer adam for small CPU runs.
--init-weights starts both backbones from a model you have (a classifier of ours or an
imported one with the same backbone)."""
EXAMPLES = """  cxr-train cia --data NIH --box-fraction 0.4 --negatives paired --out models/cia.cxrbundle
  cxr-train cia --data NIH --annotations project.cxrann --out models/cia.cxrbundle
  cxr-train cia --annotations vindr_project.cxrann --backbone tiny --out models/cia_vindr.cxrbundle
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
    p.add_argument("--beta-b", type=float, default=5.0, help="weight beta_B of the box loss (Eq. 6)")
    p.add_argument("--bank-size", type=int, default=64, help="normal images stored in the bundle for pairing")
    p.add_argument("--prior", type=float, default=0.01,
                   help="initial cell probability of the head (bias init; 0 = keep the model's init; "
                        "not applied when --init-weights gives the head)")
    add_init_weights_argument(p, "Reused: the backbone, for both the feature branch and the attention "
                                 "branch's encoder (--backbone must be the bundle's); the attention conv and "
                                 "grid head only from a CIA-Net bundle with the same classes")
    add_data_arguments(p, labels=True)
    add_train_arguments(p, epochs=15, batch_size=6, lr=1e-3, optimizer="sgd")
    p.set_defaults(size=512, weight_decay=1e-4, lr_step_epochs=5)


def merge_annotations(records: list, store_path: str | Path, *, status: list[str] | None = None) -> list:
    """Records with the store's labels and boxes applied (see ``--annotations``), in the project's
    label set (:func:`training.data.labels.read_annotations`, which also gives the set and counts).

    Matched by file stem (the NIH key). Labels: present -> 1, absent -> 0; uncertain keeps the
    CSV label (a new image: 0). A box of a class implies the class is present. A store study
    with accepted boxes replaces the CSV boxes of that image.
    """
    from ..data.labels import read_annotations

    return read_annotations(records, store_path, status=status).records


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import save_bundle
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.models import create_model

    from ..data import dataset_preprocess
    from ..trainers.classify import provenance
    from ..trainers.cia import train_cia, with_bank_attention
    from ..trainers.loop import dist_info, held_record

    if getattr(args, "align", None) and args.negatives == "canonical":
        raise SystemExit("--negatives canonical pairs with the canonical lung crop, but --align trains on the "
                         "models' frame (the whole registered chest): use --negatives paired or random "
                         "(aligned training normals, the bank the app pairs with)")
    data = labelled_datasets(args)
    train_ds, val_ds = data.train_ds, data.val_ds
    kwargs = model_kwargs(args, data.classes, backbone=args.backbone)
    import torch

    torch.manual_seed(args.seed)  # --seed seeds the weights too
    model = create_model("cia", **kwargs)
    init = init_weights(args, model, data.classes)
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
    prov = provenance(command_line(), cfg, args.data or args.annotations, history, fold=args.fold, n_folds=args.n_folds,
                      n_train=len(data.train_r), n_val=len(data.val_r), **data.provenance(args),
                      cia={k: v for k, v in info.items() if k != "normal_bank"}, research_demo=True,
                      cache_alignment=getattr(train_ds, "alignment", None), **init_provenance(init))
    extras_info = {"normal_bank": info.get("normal_bank", {})}
    norm = dataset_preprocess(train_ds).to_manifest()["normalisation"]
    model = model.cpu()
    extras = with_bank_attention(model, extras, args.size, norm)  # the bank's M-, computed once here
    path = save_bundle(model, args.out, classes=list(data.classes), label_set=data.manifest_label_set(),
                       input_size=args.size, normalisation=norm, role="cia",
                       provenance=prov, extras=extras,
                       extras_info=extras_info, overwrite=True,
                       description=f"CIA-Net ({args.backbone}), {args.box_fraction:.0%} boxes, "
                                   f"{args.negatives} negatives")
    final = held_record(history, cfg).get("metrics", {})  # the epoch the bundle holds
    print(json.dumps({"bundle": str(path), "mean_auroc": final.get("mean_auroc"),
                      "loc_iou_0.3": final.get("loc_iou_0.3")}))
    return 0
