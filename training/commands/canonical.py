"""Build the canonical chest: the average of normal radiographs, sharpened by iterative
re-averaging after aligning each normal to the current average, cropped around the lungs
(CIA-Net M4; cia-net-alignment-contrast-attention.txt Sec. 3.1).

    cxr-train canonical --data /work/shared/data/nih --out resources/canonical_chest.png
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import time
from pathlib import Path

from .common import command_line

#: what ``cxr-train canonical --help`` says
DESCRIPTION = """Build the canonical chest: the average of the "No Finding" radiographs of an NIH-layout
folder, sharpened by re-averaging after registering each one to the current average, and
cropped around the lungs, as in CIA-Net. Writes the PNG and a provenance .json beside it;
the alignment module and the app align every study to this image."""
EXAMPLES = """  cxr-train canonical --data NIH --out resources/canonical_chest.png"""

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="NIH-layout folder; its 'No Finding' images are averaged")
    p.add_argument("--out", required=True, help="PNG to write (a provenance .json is written beside it)")
    p.add_argument("--size", type=int, default=256, help="output size in pixels (default 256)")
    p.add_argument("--work-size", type=int, default=384,
                   help="resolution the normals are averaged at before the crop (default 384)")
    p.add_argument("--iterations", type=int, default=3, help="register-and-re-average rounds (default 3)")
    p.add_argument("--model", default=None, help="alignment bundle to align the normals first (optional)")
    p.add_argument("--limit", type=int, default=0, help="use at most N normals (0 = all)")
    p.add_argument("--no-crop", action="store_true", help="keep the full frame (no lung crop)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from cxrviewer.core.checksum import sha256_file

    from ..canonical import build_canonical
    from ..data import load_records
    from ..data.dataset import load_pixels
    from ..data.transforms import resize_image_and_boxes

    t0 = time.perf_counter()
    normals = [r for r in load_records(args.data) if r.is_normal]
    if args.limit:
        normals = normals[: args.limit]
    if not normals:
        raise SystemExit(f"{args.data}: no normal ('No Finding') images")
    imgs = torch.stack([torch.from_numpy(resize_image_and_boxes(load_pixels(r.path), [], args.work_size)[0])
                        for r in normals])[:, None].float().clamp(0, 1)
    log.info("loaded %d normals at %d px", len(normals), args.work_size)
    aligner = None
    if args.model:
        from cxrviewer.core.bundle import load_bundle
        from cxrviewer.core.preprocess import Preprocess

        b = load_bundle(args.model)
        m, s = b.model.float(), int(b.manifest.input_size[0])
        pre = Preprocess.from_manifest(b.manifest)

        def aligner(x: torch.Tensor) -> torch.Tensor:
            xs = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                                 antialias=True)
            return m(pre.stretch_normalise(xs))["theta"]
    res = build_canonical(imgs, size=args.size, iterations=args.iterations, aligner=aligner,
                          crop=not args.no_crop)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(res["image"] * 255.0), 0, 255).astype(np.uint8), mode="L").save(out)
    meta = {
        "what": "canonical chest: average of normal radiographs, iteratively re-averaged after affine "
                "registration to the current average, cropped around the lung field (CIA-Net M4)",
        "command": command_line(),
        "data": str(args.data),
        "count": len(normals),
        "selection": "Finding Labels == 'No Finding'",
        "work_size": args.work_size,
        "size": args.size,
        "iterations": args.iterations,
        "aligner": str(args.model) if args.model else "classical NCC registration (training.canonical)",
        "crop_box": list(res["crop_box"]),
        "crop_box_convention": "(x0, y0, x1, y1) fractions of the registered full-frame average",
        "mean_ncc_per_round": res["ncc"],
        "sharpness_per_round": res["sharpness"],
        "sha256": sha256_file(out),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"canonical": str(out), "count": len(normals), "crop_box": meta["crop_box"],
                      "mean_ncc_per_round": res["ncc"]}))
    return 0
