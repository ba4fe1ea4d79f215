"""Attention mining (M2): train the MSA network plainly (or start from --init), then fine-tune it with
class-specific erasure (iterative-attention-mining Eq. 1-3) and knowledge preservation (Eq. 4-6).

    cxr-train mine --data DIR --arch msa --size 512 --pretrain-epochs 5 --epochs 3 --kp kp \
        --out resources/models/msa_am.cxrbundle
    cxr-train mine --data DIR --init msa.cxrbundle --kp vanilla --epochs 3 --out am_vanilla.cxrbundle
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from .common import (add_data_arguments, add_init_weights_argument, add_train_arguments, command_line,
                     init_normalisation, init_provenance, init_weights, labelled_datasets, model_kwargs,
                     train_config)

#: what ``cxr-train mine --help`` says
DESCRIPTION = """Train a classifier with iterative attention mining: train the MSA network plainly (or start
from --init), then fine-tune it by erasing each class's most attended region, with knowledge
preservation (--kp). Writes a bundle whose attention-mining steps the app shows. --init-weights
starts --arch's backbone from a model you have (then pre-trained and mined as usual). The classes
come from the data: the NIH 14 for an NIH folder, an annotation project's label set with
--annotations, or --label-set NAME|FILE."""
EXAMPLES = """  cxr-train mine --data NIH --arch msa --size 512 --pretrain-epochs 5 --epochs 3 --kp kp --out models/am.cxrbundle
  cxr-train mine --data NIH --init msa.cxrbundle --kp vanilla --epochs 3 --out models/am_vanilla.cxrbundle
  cxr-train mine --data NIH --arch resnet50_msa --init-weights imported.cxrbundle --pretrain-epochs 2 \
      --out models/am_ft.cxrbundle"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention mining")
    g.add_argument("--arch", default="msa", help="classifier architecture when not starting from --init")
    g.add_argument("--arch-kwargs", default=None, help='JSON kwargs, e.g. \'{"backbone": "tiny"}\'')
    g.add_argument("--init", default=None, help="start from this trained classifier bundle (no pre-training)")
    add_init_weights_argument(g, "Reused for a new --arch network (not with --init, which gives every weight): "
                                 "the backbone; the head too from an --arch bundle with the same classes. "
                                 "The plain --pretrain-epochs still run before mining")
    g.add_argument("--pretrain-epochs", type=int, default=5,
                   help="plain weighted-BCE epochs before mining when no --init (default 5)")
    g.add_argument("--pretrain-lr", type=float, default=None, help="lr of the plain phase (default: --lr)")
    g.add_argument("--kp", choices=["none", "vanilla", "kp"], default="kp",
                   help="none: erase every image; vanilla: first N/8 only; kp: vanilla + frozen-copy loss")
    g.add_argument("--lam", type=float, default=0.5, help="lambda of Eq. 6 (default 0.5)")
    g.add_argument("--erase-fraction", type=float, default=0.125, help="n/N for vanilla and kp (default 1/8)")
    g.add_argument("--erase", choices=["all", "positive"], default="all",
                   help="erase every class's peak (paper) or only the labelled classes'")
    g.add_argument("--steps", type=int, default=3, help="AM steps T recorded for the viewer (default 3)")
    add_data_arguments(p, labels=True)
    add_train_arguments(p, epochs=3)


def _continue_from(bundle, path: str, classes, *datasets) -> dict:
    """Check that an ``--init`` bundle is a grayscale classifier of the training ``classes`` and make
    ``datasets`` feed its normalisation; returns that normalisation (written to the new bundle)."""
    from cxrviewer.core.errors import CxrError

    from ..init_weights import apply_normalisation, backbones_of, class_order

    bbs = list(backbones_of(bundle.model).values())
    channels = int(bbs[0].stem[0].weight.shape[1]) if bbs else 1
    if channels != 1 or class_order(bundle.manifest.classes, classes) != list(range(len(classes))):
        raise SystemExit(f"cxr-train mine: --init {path} ({len(bundle.manifest.classes)} classes, {channels} "
                         f"input channels) is not a grayscale classifier of the {len(classes)} training classes "
                         f"in their order; "
                         f"use --arch with --init-weights {path} to start from its backbone with a new head")
    try:
        return apply_normalisation(datasets, bundle.manifest.normalisation)
    except CxrError as err:
        raise SystemExit(f"cxr-train mine: --init: {err}") from err


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.models import create_model, get_spec

    from ..trainers.classify import provenance, save_classifier_bundle, train_classifier
    from ..trainers.loop import dist_info, held_record
    from ..trainers.mine import MiningConfig, mine

    if args.init and args.init_weights:
        raise SystemExit("cxr-train mine: --init gives every weight of the network; drop --init-weights "
                         "(or use --init-weights with --arch instead of --init)")
    data = labelled_datasets(args)
    train_ds, val_ds = data.train_ds, data.val_ds
    cfg = train_config(args, kp=args.kp, lam=args.lam, erase_fraction=args.erase_fraction, erase=args.erase)
    run_dir = Path(cfg.out_dir)
    if cfg.run_config and dist_info()[0] == 0:  # OUT.run/config.yaml as elsewhere (each phase has one too)
        from ..config_files import write_config

        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg.run_config)
    if args.no_resume:
        for sub in ("pretrain", "mine"):
            (run_dir / sub / "checkpoint.pt").unlink(missing_ok=True)
    pre_history: list[dict] = []
    init, norm = None, None
    if args.init:
        b = load_bundle(args.init)
        if b.manifest.family != "classifier":
            raise SystemExit(f"{args.init} is not a classifier bundle")
        norm = _continue_from(b, args.init, data.classes, train_ds, val_ds)
        model = b.model
        model.requires_grad_(True)
        model.train()
    else:
        if get_spec(args.arch).family != "classifier":
            raise SystemExit(f"{args.arch} is not a classifier-family architecture")
        import torch

        torch.manual_seed(args.seed)  # --seed seeds the weights too
        model = create_model(args.arch, **model_kwargs(args, data.classes))
        init = init_weights(args, model, data.classes)
        norm = init_normalisation(init, train_ds, val_ds)
        if args.pretrain_epochs > 0:
            pre_cfg = replace(cfg, epochs=args.pretrain_epochs, lr=args.pretrain_lr or cfg.lr,
                              out_dir=str(run_dir / "pretrain"))
            model, pre_history = train_classifier(model, train_ds, val_ds, pre_cfg)
    if not hasattr(model, "cam_weights"):
        raise SystemExit(f"{model.arch} has no CAM head; attention mining needs one")
    mining = MiningConfig(kp=args.kp, lam=args.lam, erase_fraction=args.erase_fraction, erase=args.erase)
    mine_cfg = replace(cfg, out_dir=str(run_dir / "mine"))
    model, history = mine(model, train_ds, val_ds, mine_cfg, mining)
    if dist_info()[0] == 0:
        mining_d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(mining).items()}
        prov = provenance(command_line(), mine_cfg, args.data or args.annotations, history, fold=args.fold,
                          n_folds=args.n_folds, n_train=len(data.train_r), n_val=len(data.val_r), init=args.init,
                          **data.provenance(args),
                          pretrain_epochs=len(pre_history), mining=mining_d, am_steps=args.steps,
                          pretrain_final=(pre_history[-1].get("metrics", {}).get("mean_auroc")
                                          if pre_history else None), **init_provenance(init))
        path = save_classifier_bundle(model, args.out, input_size=args.size, provenance=prov, normalisation=norm,
                                      classes=data.classes, label_set=data.manifest_label_set())
        final = held_record(history, mine_cfg).get("metrics", {})  # the epoch the bundle holds
        print(json.dumps({"bundle": str(path), "kp": args.kp, "mean_auroc": final.get("mean_auroc")}))
    return 0
