"""Measurement: how much of each official NIH box lies inside the field each model bundle sees.

    python benchmarks/field_of_view.py [NIH_DIR] [--models DIR ...] [--map-size 1024] [--limit N]
        [--out benchmarks/results/field_of_view.json]

For each bundle in ``resources/models`` (and in every ``--models DIR``), run as the app runs it:
the folder's bundles get their roles (``cxrviewer.core.roles.assign_roles``), the app's
pipeline (``cxrviewer.core.pipeline.Pipeline``, alignment stage only) aligns each boxed study,
and the field a network sees is its input drawn back onto the original the way its maps are
(an :class:`~cxrviewer.core.explain.context.ExplainContext` mapper: the manifest crop, then the
inverse alignment warp, as ``valid_region`` in cxrviewer/core/explain/alignment.py does for the
alignment's ``valid`` map). The classifier, DM and CIA networks see the aligned frame: the whole
registered chest (the full-frame extent of the canonical lung crop, resources/canonical_chest.json
``crop_box``; ``align_for_models`` / ``full_frame_theta``, the ``affine`` map of results.h5);
segmentation and alignment see the original frame (cxrviewer/core/explain/segmentation.py, alignment.py).

Reported per bundle and per class: the fraction of boxes FULLY inside the field, the mean
fraction of each box's area inside, and the mean fraction of the image the field covers. Boxes
are counted on the map grid (``--map-size``, default 512 as ``cxrviewer analyze``: 2 x 2 pixels of
the 1024 x 1024 PNGs a cell). Only boxes whose image is in the folder are measured. The JSON
records the commit and the app files modified in the working tree the run used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrviewer.core.explain.context import ExplainContext, Mapper, scaled_shape  # noqa: E402  (after the path line)
from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.pipeline import Pipeline  # noqa: E402
from cxrviewer.core.results import Results  # noqa: E402

#: roles whose networks see the aligned working frame (``ctx.work``): the classifier pass in
#: cxrviewer/core/explain/context.py, ``ctx.forward("dm")`` in disease_masks.py, contrast.py
ALIGNED_ROLES = ("classifier", "dm", "cia")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--models", action="append", default=[], metavar="DIR", help="another bundle folder")
    ap.add_argument("--map-size", type=int, default=512, help="longest side of the maps (default 512, as analyze)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N boxed studies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "field_of_view.json"))
    return ap.parse_args(argv)


def seen_field(mapper: Mapper) -> np.ndarray:
    """Bool ``map_shape``: where a network input cut at ``mapper.box`` lands on the original,
    through the functions :class:`Mapper` draws maps with (crop, then the inverse warp)."""
    from cxrviewer.core.models.alignment import warp
    from cxrviewer.core.preprocess import maps_to_frame

    ones = maps_to_frame(torch.ones(1, 2, 2), mapper.map_shape, mapper.box, mapper.frame_shape, mode="nearest")
    if mapper.theta_inv is not None:
        with torch.no_grad():
            ones = warp(ones[None], mapper.theta_inv.float())[0]
    return ones[0].numpy() > 0.5


def role_fields(pl: Pipeline, res: Results, frame_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The field of every loaded role for one study the pipeline aligned (``res``)."""
    ctx = ExplainContext(res, pl.bundles, pl.device, torch.zeros(1, 1, *frame_shape))
    affine = res.get("alignment", "affine")
    if affine is not None and not res.attr("alignment", "rejected", False):  # rejected: later networks unaligned
        ctx.set_alignment(torch.as_tensor(affine, dtype=torch.float32)[None])
    fields: dict[str, np.ndarray] = {}
    cache: dict[tuple, np.ndarray] = {}
    for role in pl.bundles:
        box = ctx.preprocess(role).crop_box(frame_shape)
        aligned = role in ALIGNED_ROLES and ctx.theta_inv is not None
        if (box, aligned) not in cache:
            cache[(box, aligned)] = seen_field(ctx.mapper(box, aligned=aligned))
        fields[role] = cache[(box, aligned)]
    return fields


def box_inside(field: np.ndarray, b: Box, res: Results) -> float:
    """The fraction of box ``b`` (original pixels) inside ``field``, counted on the map grid
    (cells beyond the image count as not seen)."""
    sy, sx = res.map_scale
    y0, x0 = math.floor(b.y / sy), math.floor(b.x / sx)
    y1, x1 = max(math.ceil(b.y2 / sy), y0 + 1), max(math.ceil(b.x2 / sx), x0 + 1)
    seen = field[max(0, y0):max(0, y1), max(0, x0):max(0, x1)].sum()
    return float(seen) / ((y1 - y0) * (x1 - x0))


def _summary(values: list[float], covers: list[float] | None = None) -> dict[str, Any]:
    a = np.asarray(values, np.float64)
    out = {"n_boxes": int(a.size), "fully_inside": round(float((a >= 1.0 - 1e-9).mean()), 4) if a.size else None,
           "mean_area_inside": round(float(a.mean()), 4) if a.size else None}
    if covers is not None:
        out["mean_image_fraction_seen"] = round(float(np.mean(covers)), 4) if covers else None
    return out


def measure_folder(models: Path, refs: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Field-of-view statistics of every bundle in ``models`` over the boxed studies ``refs``."""
    pl = Pipeline.from_dirs(models, "cpu", map_max_side=args.map_size, methods=["alignment"])
    inside: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    covers: dict[str, list[float]] = defaultdict(list)
    valid_agree: list[float] = []
    checks: list[dict[str, Any]] = []
    for ref in refs:
        study = ref.load()
        res = pl.run(study)
        checks.append(res.attrs.get("alignment", {}))
        fields = role_fields(pl, res, scaled_shape(study.shape, pl.frame_max_side))
        valid = res.get("alignment", "valid")
        if valid is not None and "classifier" in fields:
            valid_agree.append(float((valid == fields["classifier"]).mean()))
        for role, field in fields.items():
            covers[role].append(float(field.mean()))
            for b in study.gt_boxes:
                inside[role][b.label].append(box_inside(field, b, res))
    bundles = []
    for role, b in pl.bundles.items():
        per_class = {c: _summary(v) for c, v in sorted(inside[role].items())}
        bundles.append({"bundle": b.path.name, "role": role, "family": b.manifest.family,
                        "frame": "aligned" if role in ALIGNED_ROLES and "alignment" in pl.bundles else "original",
                        "crop": b.manifest.crop, "input_size": list(b.manifest.input_size),
                        **_summary([v for vs in inside[role].values() for v in vs], covers[role]),
                        "per_class": per_class})
    align = pl.bundles.get("alignment")
    quality = [c["quality"] for c in checks if c.get("quality") is not None]
    return {"models": str(models), "alignment": align.path.name if align is not None else None,
            "alignment_rejected": sum(bool(c.get("rejected")) for c in checks),
            "alignment_refined": sum(bool(c.get("refined")) for c in checks),
            "alignment_median_quality": round(float(np.median(quality)), 4) if quality else None,
            "classifier_field_equals_alignment_valid": round(float(np.mean(valid_agree)), 6) if valid_agree else None,
            "bundles": bundles}


def markdown(result: dict[str, Any]) -> str:
    """The per-bundle table (and per-class columns) for docs/field-of-view.md."""
    classes = sorted({c for f in result["folders"] for b in f["bundles"] for c in b["per_class"]})
    head = ["bundle", "role", "frame", "image seen", "boxes fully inside", "mean box area inside", *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in result["folders"]:
        for b in f["bundles"]:
            cells = [f"{b['per_class'][c]['fully_inside']:.2f} / {b['per_class'][c]['mean_area_inside']:.2f}"
                     if c in b["per_class"] else "–" for c in classes]
            lines.append("| " + " | ".join([b["bundle"], b["role"], b["frame"], f"{b['mean_image_fraction_seen']:.2f}",
                                            f"{b['fully_inside']:.3f}", f"{b['mean_area_inside']:.3f}", *cells]) + " |")
    return "\n".join(lines)


def _git_state() -> dict[str, Any]:
    """The commit and the modified app files (``cxrviewer/``) of the checkout the run used."""
    def git(*a: str) -> list[str]:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.splitlines()

    return {"commit": "".join(git("rev-parse", "HEAD")),
            "modified": [line[3:] for line in git("status", "--porcelain", "--", "cxrviewer")]}


def main(argv: list[str] | None = None) -> int:
    """Measure, write the JSON and print the markdown table."""
    from cxrviewer.core.io import read_nih_folder

    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    refs = [r for r in read_nih_folder(args.nih_dir) if r.gt_boxes]
    refs = refs[: args.limit] if args.limit else refs
    folders = list(dict.fromkeys(Path(p).resolve() for p in [REPO / "resources" / "models", *args.models]))
    canonical = json.loads((REPO / "resources" / "canonical_chest.json").read_text(encoding="utf-8"))
    result = {"what": "fraction of official NIH boxes inside the field each bundle sees (as the app runs it)",
              "data": args.nih_dir, "n_images": len(refs), "n_boxes": sum(len(r.gt_boxes) for r in refs),
              "map_size": args.map_size, "canonical_crop_box": canonical.get("crop_box"),
              "folders": [measure_folder(f, refs, args) for f in folders]}
    result.update(seconds=round(time.perf_counter() - t0, 1), threads=args.threads,
                  command=" ".join(["python benchmarks/field_of_view.py", *(sys.argv[1:] if argv is None else argv)]),
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), git=_git_state())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"{result['n_boxes']} boxes on {result['n_images']} images, {result['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
