"""Write the shipped location prior: the median official NIH box per class, as fractions of the image.

    python benchmarks/make_location_prior.py [NIH_DIR] [--out resources/priors/nih_median_boxes.json]

Reads every row of the official box file (``BBox_List_2017.csv[.gz]``, boxes in the 1024 x 1024
frame of the released PNGs, ``cxrviewer.core.io.nih.BOX_FRAME``; the images need not be present),
divides each box by that frame and takes the coordinate-wise median per class
(``cxrviewer.core.explain.prior.location_prior``, i.e. the evaluation floor's ``floor_boxes``).
The file records its data, box count per class, command and date. The ``prior`` explainer
(cxrviewer/core/explain/prior.py) reads it when a bundle carries no prior of its own. Every
official box is in it, so on NIH images it has seen the test boxes.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrviewer.core.geometry import Box  # noqa: E402  (after the path line above)


def official_boxes(nih_dir: Path) -> tuple[list[Box], int]:
    """Every official box as fractions of its image, and the number of images they are on."""
    from cxrviewer.core.classes import canonical
    from cxrviewer.core.io.nih import BOX_FRAME

    path = sorted(nih_dir.glob("BBox_List_2017*.csv*"))[-1]
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
        rows = [r for r in list(csv.reader(f))[1:] if len(r) >= 6]
    boxes = [Box(canonical(r[1]), *(float(v) / BOX_FRAME for v in r[2:6])) for r in rows]
    return boxes, len({r[0] for r in rows})


def main(argv: list[str] | None = None) -> int:
    """Write the prior file (see the module docstring)."""
    from cxrviewer.core.explain.prior import location_prior

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--out", default=str(REPO / "resources" / "priors" / "nih_median_boxes.json"))
    args = ap.parse_args(argv)
    boxes, n_images = official_boxes(Path(args.nih_dir))
    record = {
        "what": "median official NIH ChestX-ray14 box per class (coordinate-wise median of x, y, w, h)",
        "frame": "fractions of the image: x and w of its width, y and h of its height",
        **location_prior(boxes),
        "n_boxes": len(boxes),
        "n_images": n_images,
        "data": args.nih_dir,
        "box_file": "BBox_List_2017.csv (every official box, 1024 x 1024 frame)",
        "caveat": "computed from ALL official boxes: on NIH images it has seen the test boxes (optimistic)",
        "command": " ".join(["python benchmarks/make_location_prior.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{out}: {len(boxes)} boxes of {n_images} images, {len(record['boxes'])} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
