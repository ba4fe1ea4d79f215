"""``cxrviewer export PROJECT.cxrann --format F --out TARGET``: an annotation project's export.

The same as ``cxrviewer annotations export PROJECT TARGET --format F`` (:mod:`.annotations`):
COCO (with ``score`` and box polygons), COCO results (model proposals, pycocotools ``loadRes``),
VOC (VOCdevkit layout), YOLO (Ultralytics layout), the NIH box csv, and DICOM (a folder per
study: TID 1500 SR + GSPS, or with ``dicom-seg`` binary SEGs of the lung/heart masks and of
thresholded finding maps plus a fractional SEG of the maps; a Secondary Capture first for
PNG/JPEG/NIH studies). ``dicom-seg`` takes the masks and maps from each study's stored analysis
(``results.h5`` beside the image or under ``--results PATH``), else runs the bundled
segmentation model (not with ``--no-model``).
"""
from __future__ import annotations

import argparse

from . import annotations as _annotations

DESCRIPTION = __doc__.splitlines()[0].replace("``", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``PROJECT --format F --out TARGET`` and the export options of :mod:`.annotations`."""
    p.add_argument("project", help="the annotation project (.cxrann), opened read-only")
    p.add_argument("--out", required=True, dest="target", metavar="TARGET", help=_annotations.TARGET_HELP)
    _annotations.export_options(p)
    p.set_defaults(action="export", annotator=None)


def run(args: argparse.Namespace) -> int:
    """Export; 0 on success, 2 and one line on stderr otherwise (nothing written then)."""
    return _annotations.run(args)
