"""``cxrviewer import PROJECT.cxrann --format F FILE [--studies DIR]``: boxes into a project.

The same as ``cxrviewer annotations import PROJECT FILE --format F`` (:mod:`.annotations`):
COCO, the NIH box csv, DICOM SR (TID 1500), GSPS and SEG (one box per segment: its bounding box;
lung/heart segments only when the project's label set has them). The project is created when it
does not exist (``--label-set``); classes the project's label set cannot map are refused whole
unless ``--map NAME=LABEL``, ``--add-unknown`` or ``--skip NAME`` says what to do with them.
"""
from __future__ import annotations

import argparse

from . import annotations as _annotations

DESCRIPTION = __doc__.splitlines()[0].replace("``", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``PROJECT FILE --format F`` and the import options of :mod:`.annotations`."""
    p.add_argument("project", help="the annotation project (.cxrann; created when it does not exist)")
    p.add_argument("file", help="the COCO JSON, NIH csv, DICOM SR, GSPS or SEG file")
    _annotations.import_options(p)
    p.add_argument("--annotator", default=None, help="name recorded on the imported boxes (default: the login name)")
    p.set_defaults(action="import")


def run(args: argparse.Namespace) -> int:
    """Import; 0 on success, 2 and one line on stderr otherwise (nothing written then)."""
    return _annotations.run(args)
