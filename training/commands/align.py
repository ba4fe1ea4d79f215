"""Train the alignment module (CIA-Net M4) towards the canonical chest and write a bundle.

Loss: L1 on the affine for known random perturbations, anchored by NCC registration to the
canonical chest (or the phantom ground truth), plus the Euclidean + perceptual loss on
B(G(warped)) (disease-masks Eq. 6-9). See training/trainers/align.py and docs/alignment.md.

    cxr-train align --data /work/shared/data/nih --canonical resources/canonical_chest.png \\
        --arch-kwargs '{"backbone": "tiny"}' --epochs 60 --out resources/models/alignment.cxrbundle
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import add_data_arguments, add_train_arguments, command_line, datasets, parse_kwargs, train_config

#: what ``cxr-train align --help`` says
DESCRIPTION = """Train the alignment module (CIA-Net) that registers a chest X-ray to the canonical chest, and
write an alignment bundle. The loss combines the error on known random affine perturbations
with an image loss on the warped image (Euclidean plus perceptual). A held-out recovery check
runs every --eval-every epochs."""
EXAMPLES = """  cxr-train align --data NIH --canonical resources/canonical_chest.png \
      --arch-kwargs '{"backbone": "tiny"}' --epochs 60 --out models/alignment.cxrbundle"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--canonical", required=True, help="canonical chest PNG (cxr-train canonical)")
    p.add_argument("--arch", default="alignment", help="alignment-family registry name (default alignment)")
    p.add_argument("--arch-kwargs", default=None, help='JSON kwargs, e.g. \'{"backbone": "tiny"}\'')
    g = p.add_argument_group("alignment loss")
    g.add_argument("--rotation", type=float, default=12.0, help="max random rotation, degrees (default 12)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.9, 1.1), metavar=("MIN", "MAX"),
                   help="range of the random scale")
    g.add_argument("--shift", type=float, default=0.10, help="max random shift, fraction of the size (0.10)")
    g.add_argument("--param-weight", type=float, default=10.0, help="weight of the L1 loss on the affine parameters")
    g.add_argument("--image-weight", type=float, default=0.5, help="weight of the Eq. 6-9 image loss")
    g.add_argument("--perceptual-weight", type=float, default=1.0,
                   help="weight of the perceptual term inside the image loss (1 = Eq. 9; random-init features)")
    g.add_argument("--consistency-weight", type=float, default=0.0,
                   help="un-anchored consistency |R T(I_R) - T(I)| (second forward pass)")
    g.add_argument("--fp16-weights", action="store_true", help="store the bundle weights as float16")
    g.add_argument("--eval-every", type=int, default=1, help="held-out recovery check every N epochs")
    add_data_arguments(p)
    add_train_arguments(p, epochs=30, batch_size=16, lr=1e-3)


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.canonical import canonical_crop_box, load_canonical
    from cxrviewer.core.models import create_model, get_spec

    from ..data import AugmentConfig
    from ..phantoms import TRUTH_FILE
    from ..trainers.align import AlignConfig, evaluate_alignment, save_alignment_bundle, train_alignment
    from ..trainers.classify import provenance
    from ..trainers.loop import dist_info

    if get_spec(args.arch).family != "alignment":
        raise SystemExit(f"{args.arch} is not an alignment-family architecture")
    if not Path(args.canonical).is_file():
        raise SystemExit(f"canonical chest {args.canonical} not found (build it with cxr-train canonical)")
    model = create_model(args.arch, **parse_kwargs(args.arch_kwargs))
    _, train_ds, val_ds, train_r, val_r = datasets(args, augment=False)
    if not args.no_augment:  # intensity only: the geometry is the loss's own known perturbation
        train_ds.augment_cfg = AugmentConfig(rotation_deg=0.0, scale=0.0, shift=0.0)
    truth = None
    tpath = Path(args.data) / TRUTH_FILE
    if tpath.is_file():
        truth = json.loads(tpath.read_text(encoding="utf-8"))
    acfg = AlignConfig(rotation_deg=args.rotation, scale_min=args.scale_range[0], scale_max=args.scale_range[1],
                       shift=args.shift, param_weight=args.param_weight, image_weight=args.image_weight,
                       perceptual_weight=args.perceptual_weight, consistency_weight=args.consistency_weight)
    cfg = train_config(args, arch=model.arch, align=acfg.__dict__)
    if args.no_resume:
        (Path(cfg.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    canonical = load_canonical(args.canonical, args.size)
    model, history, info = train_alignment(model, train_ds, canonical, cfg, acfg=acfg, val_ds=val_ds,
                                           crop_box=canonical_crop_box(args.canonical), truth=truth,
                                           train_keys=[r.key for r in train_r], eval_every=args.eval_every)
    if dist_info()[0] != 0:
        return 0
    metrics = evaluate_alignment(model, val_r, canonical, truth=truth, size=args.size) if val_r else {}
    prov = provenance(command_line(), cfg, args.data, history, fold=args.fold, n_folds=args.n_folds,
                      n_train=len(train_r), n_val=len(val_r), anchors=info, held_out=metrics)
    path = save_alignment_bundle(model, args.out, canonical=args.canonical, input_size=args.size,
                                 provenance=prov, half=args.fp16_weights)
    rec = metrics.get("recovery", {})
    print(json.dumps({"bundle": str(path), "median_rotation_deg": rec.get("median_rotation_deg"),
                      "median_shift_pct": rec.get("median_shift_pct"),
                      "ncc_before": metrics.get("ncc_before"), "ncc_after": metrics.get("ncc_after")}))
    return 0
