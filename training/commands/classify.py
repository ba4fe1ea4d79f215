"""Train a classifier (weighted BCE, disease-masks Eq. 10) and write a bundle the app loads.

Any classifier-family architecture of the registry: the baseline CAM network,
space attention, attention-gated, MSA, lung/heart.

    cxr-train classify --data DIR --arch resnet50 --size 512 --epochs 5 --out resources/models/cls.cxrbundle
    torchrun --nproc_per_node 2 -m training.cli classify ...   (DistributedDataParallel)
"""
from __future__ import annotations

import argparse
import json
import logging

from .common import (add_data_arguments, add_init_weights_argument, add_train_arguments, command_line,
                     init_normalisation, init_provenance, init_weights, labelled_datasets, model_kwargs,
                     train_config)

#: what ``cxr-train classify --help`` says
DESCRIPTION = """Train a chest X-ray classifier (weighted binary cross-entropy) and write a model bundle the
app loads. The classes come from the data: the NIH 14 for an NIH folder, an annotation project's
label set with --annotations (its labels and accepted boxes), or --label-set NAME|FILE. Any classifier architecture of the registry works: the
baseline CAM network, space attention, attention-gated, MSA, lung/heart. A checkpoint is saved
every epoch in OUT.run/ (rerun the same command to resume) with a log.jsonl; the bundle holds
the epoch with the best held-out mean AUROC (printed at the end; --early-stop N stops after N
epochs without improvement). --init-weights fine-tunes a model you have (one of
ours or an imported one) instead of starting from random weights."""
EXAMPLES = """  cxr-train classify --data NIH --arch resnet50 --size 512 --epochs 5 --out models/cls.cxrbundle
  cxr-train classify --data NIH --arch densenet121 --init-weights chexnet.cxrbundle --out models/ft.cxrbundle
  cxr-train classify --annotations vindr_project.cxrann --arch densenet121 --out models/vindr.cxrbundle
  torchrun --nproc_per_node 2 -m training.cli classify ...   (several GPUs)"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="cam_classifier", help="registry name or alias (e.g. resnet50, tiny, msa)")
    p.add_argument("--arch-kwargs", default=None, help='JSON kwargs, e.g. \'{"backbone": "tiny"}\'')
    add_init_weights_argument(p, "Reused: the backbone; the head too when the bundle has the same architecture "
                                 "(or is cam_classifier and --arch dm) and the same classes as the data")
    add_data_arguments(p, labels=True)
    add_train_arguments(p, auto_workers=True)


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.models import create_model, get_spec

    from ..trainers.classify import provenance, save_classifier_bundle, train_classifier
    from ..trainers.loop import dist_info, held_record

    if get_spec(args.arch).family != "classifier":
        raise SystemExit(f"{args.arch} is not a classifier-family architecture")
    import torch

    data = labelled_datasets(args)
    train_ds, val_ds = data.train_ds, data.val_ds
    kwargs = model_kwargs(args, data.classes)
    torch.manual_seed(args.seed)  # --seed seeds the weights too
    model = create_model(args.arch, **kwargs)
    init = init_weights(args, model, data.classes)
    norm = init_normalisation(init, train_ds, val_ds)
    cfg = train_config(args, arch=model.arch)
    if args.no_resume:
        from pathlib import Path

        (Path(cfg.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    model, history = train_classifier(model, train_ds, val_ds, cfg)
    if dist_info()[0] == 0:
        prov = provenance(command_line(), cfg, args.data or args.annotations, history, fold=args.fold,
                          n_folds=args.n_folds, n_train=len(data.train_r), n_val=len(data.val_r),
                          **data.provenance(args),
                          cache_alignment=getattr(train_ds, "alignment", None),
                          **init_provenance(init))
        path = save_classifier_bundle(model, args.out, input_size=args.size, provenance=prov, normalisation=norm,
                                      classes=data.classes, label_set=data.manifest_label_set())
        final = held_record(history, cfg).get("metrics", {})  # the epoch the bundle holds
        print(json.dumps({"bundle": str(path), "mean_auroc": final.get("mean_auroc")}))
    return 0
