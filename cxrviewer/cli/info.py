"""Print the metadata, display window, pixel shape and pixel SHA-256 of studies, one line each.

Folders (plain or NIH ChestX-ray14) expand to all their studies. A file that
cannot be read prints a one-line error and the command goes on; the exit
status is 1 when any path failed, 0 otherwise.
"""
from __future__ import annotations

import argparse
import sys

from ..core.jsonsafe import dumps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="DICOM/PNG/JPEG/TIFF files, folders or NIH ChestX-ray14 folders")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (errors too, with ok=false; non-finite numbers as null)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds allowed to decode compressed pixel data (default 30)")


def _record(ref, study) -> dict:
    rec = {
        "path": str(ref.path),
        "ok": True,
        "key": ref.key,
        "meta": study.meta.as_dict(),
        "window": [study.window[0], study.window[1]],
        "invert_display": study.invert_display,
        "shape": list(study.shape),
        "dtype": str(study.stored.dtype),
        "pixel_sha256": study.pixel_sha256(),
    }
    if study.labels is not None:
        rec["labels"] = sorted(k for k, v in study.labels.items() if v)
        rec["gt_boxes"] = [[b.label, b.x, b.y, b.w, b.h] for b in study.gt_boxes]
    return rec


def _line(rec: dict) -> str:
    m = rec["meta"]
    h, w = rec["shape"]
    parts = [
        rec["path"],
        f"format={m['format']}",
        f"size={w}x{h}",
        f"dtype={rec['dtype']}",
        f"window={rec['window'][0]:g}/{rec['window'][1]:g}",
        f"photometric={m['photometric']}",
        f"bits={m['bits_stored']}",
    ]
    for key in ("modality", "view_position", "manufacturer", "patient_id", "transfer_syntax",
                "study_uid", "series_uid", "sop_uid"):
        if m.get(key):
            parts.append(f"{key}={m[key]}")
    if m.get("pixel_spacing"):
        parts.append("spacing={:g}x{:g}mm".format(*m["pixel_spacing"]))
    if m.get("number_of_frames", 1) > 1:
        parts.append(f"frames={m['number_of_frames']}")
    if "labels" in rec:
        parts.append("labels=" + ("|".join(rec["labels"]) or "none"))
        if rec["gt_boxes"]:
            parts.append(f"boxes={len(rec['gt_boxes'])}")
    parts.append(f"pixel_sha256={rec['pixel_sha256']}")
    if m.get("warnings"):
        parts.append("warnings=" + "; ".join(m["warnings"]))
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import CxrError
    from ..core.io import open_worklist

    failed = 0
    wl = open_worklist(args.paths)
    for err in wl.errors:
        failed += 1
        if args.json:
            print(dumps({"path": None, "ok": False, "error": err, "error_type": "WorklistError"}), flush=True)
        print(f"ERROR {err}", file=sys.stderr, flush=True)
    for ref in wl:
        try:
            study = ref.load(timeout=args.timeout)
        except CxrError as exc:
            failed += 1
            if args.json:
                print(dumps({"path": str(ref.path), "ok": False, "error": str(exc),
                                  "error_type": type(exc).__name__}), flush=True)
            print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        rec = _record(ref, study)
        print(dumps(rec, default=str) if args.json else _line(rec), flush=True)
    return 1 if failed else 0
