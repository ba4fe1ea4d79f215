"""Build an HDF5 cache of preprocessed images so an epoch is I/O-cheap.

    cxr-train cache --data NIH_FOLDER --out cache.h5 --size 256
"""
from __future__ import annotations

import argparse
import logging
import time

#: what ``cxr-train cache --help`` says
DESCRIPTION = """Build an HDF5 cache of the images of an NIH-layout folder, resized to the training size, so
that each epoch reads one file instead of decoding every PNG. The training commands take it
with --cache."""
EXAMPLES = """  cxr-train cache --data NIH --out nih256.h5 --size 256"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder (images/ + Data_Entry csv + BBox csv)")
    p.add_argument("--out", required=True, help="cache file to write (.h5)")
    p.add_argument("--size", type=int, default=256, help="square size in pixels (default 256)")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")


def run(args: argparse.Namespace) -> int:
    from ..data import build_cache, load_records
    from ..trainers.loop import Progress

    records = load_records(args.data)
    if args.limit:
        records = records[: args.limit]
    prog = Progress(len(records), "cache")
    t0 = time.perf_counter()
    build_cache(records, args.out, args.size, progress=lambda i, n: prog.update(i, 0.0, i))
    dt = time.perf_counter() - t0
    log.info("wrote %s: %d images in %.1f s (%.1f images/s)", args.out, len(records), dt, len(records) / dt)
    return 0
