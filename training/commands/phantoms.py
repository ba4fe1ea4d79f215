"""Write synthetic chest phantoms as an NIH ChestX-ray14 folder (images, CSVs, exact ground truth).

Example: ``cxr-train phantoms --out data/phantoms --n 500 --size 256 --seed 0 --masks``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cxrviewer.core.errors import CxrError

#: what ``cxr-train phantoms --help`` says
DESCRIPTION = """Write synthetic chest phantoms with exact ground truth as an NIH ChestX-ray14 folder:
images/, Data_Entry_2017.csv and BBox_List_2017.csv (and, with --masks, lung, heart and finding
masks). The same seed gives identical files. Use them to try training and evaluation without
real data."""
EXAMPLES = """  cxr-train phantoms --out data/phantoms --n 500 --size 256 --seed 0 --masks"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-train phantoms``."""
    from training.phantoms import PhantomConfig

    d = PhantomConfig()
    p.add_argument("--out", type=Path, required=True, help="output folder (NIH layout)")
    p.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--size", type=int, default=256, help="image width = height in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files")
    p.add_argument("--contrast", type=float, default=d.contrast,
                   help="lesion density multiplier (0.3 = barely visible nodules; default 1)")
    p.add_argument("--lesion-scale", type=float, default=d.lesion_scale, help="lesion size multiplier")
    p.add_argument("--normal-fraction", type=float, default=d.normal_fraction,
                   help="share of 'No Finding' images (default %(default)s)")
    p.add_argument("--max-findings", type=int, default=d.max_findings,
                   help="most findings per abnormal image (default %(default)s)")
    p.add_argument("--affine-rotation", type=float, default=d.affine_rotation,
                   help="max |rotation| in degrees (default %(default)s)")
    p.add_argument("--affine-scale", type=float, default=d.affine_scale,
                   help="scale drawn from 1 +- this (default %(default)s)")
    p.add_argument("--affine-shift", type=float, default=d.affine_shift,
                   help="max |shift| as a fraction of the size (default %(default)s)")
    p.add_argument("--noise", type=float, default=d.noise, help="detector noise multiplier")
    p.add_argument("--box-fraction", type=float, default=d.box_fraction,
                   help="share of images whose boxes go into BBox_List_2017.csv (default 1)")
    p.add_argument("--masks", action="store_true",
                   help="also write masks/{left_lung,right_lung,heart,findings}/ PNGs")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that already has a dataset (its other files stay)")
    p.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                   help="also write a 4x4 contact sheet of the first images with their boxes")


def run(args: argparse.Namespace) -> int:
    """Generate the folder; returns 0 on success, 2 on a user error."""
    from training.phantoms import PhantomConfig, contact_sheet, write_phantom_dataset

    try:
        cfg = PhantomConfig(
            contrast=args.contrast, lesion_scale=args.lesion_scale,
            normal_fraction=args.normal_fraction, max_findings=args.max_findings,
            affine_rotation=args.affine_rotation, affine_scale=args.affine_scale,
            affine_shift=args.affine_shift, noise=args.noise, box_fraction=args.box_fraction,
        ).validate()
        if args.size < 32:
            raise CxrError(f"--size {args.size} is too small (minimum 32)")
        t0 = time.perf_counter()
        out = write_phantom_dataset(args.out, args.n, args.size, args.seed, cfg, masks=args.masks,
                                    overwrite=args.overwrite)
        dt = time.perf_counter() - t0
        print(f"wrote {args.n} phantoms ({args.size} px) to {out} in {dt:.1f} s "
              f"({1000 * dt / args.n:.0f} ms/image)")
        if args.contact_sheet is not None:
            png = contact_sheet(out, args.contact_sheet, n=16)
            print(f"contact sheet: {png}")
    except CxrError as err:
        log.error("%s", err)
        return 2
    return 0
