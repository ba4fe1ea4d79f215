"""Command line: the GUI by default, headless sub-commands otherwise.

    cxrviewer [PATH ...] [--demo]      open the desktop app
    cxrviewer info PATH ... [--json]   metadata of studies, one line each
    cxrviewer analyze PATH ... --out DIR   run the pipeline headless
    cxrviewer import-model CKPT --format F --out BUNDLE   a checkpoint as a model bundle
    cxrviewer annotations new|info|import|export|add-labels PROJECT ...   annotation projects headless
    cxrviewer export PROJECT --format F --out TARGET   = annotations export (COCO/VOC/YOLO/NIH/DICOM)
    cxrviewer import PROJECT --format F FILE [--studies DIR]   = annotations import

Sub-commands live in :mod:`cxrviewer.cli`, one module each, imported
explicitly here (explicit imports survive PyInstaller).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from collections.abc import Sequence

from . import __version__
from .cli import analyze as _analyze
from .cli import annotations as _annotations
from .cli import import_model as _import_model
from .cli import info as _info
from .cli import project_export as _project_export
from .cli import project_import as _project_import

#: name -> module with ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "info": _info,
    "analyze": _analyze,
    "import-model": _import_model,
    "annotations": _annotations,
    "export": _project_export,
    "import": _project_import,
}


def _gui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxrviewer",
        description="Chest X-ray explainability and annotation desktop. "
        f"Sub-commands: {', '.join(SUBCOMMANDS)} (cxrviewer SUBCOMMAND --help).",
    )
    p.add_argument("paths", nargs="*", help="DICOM/PNG/JPEG files, folders or NIH ChestX-ray14 folders to open")
    p.add_argument("--demo", action="store_true", help="open the bundled demo studies")
    p.add_argument("--models", default=None, help="folder of model bundles (default: resources/models)")
    p.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"cxrviewer {__version__}")
    p.add_argument("--self-test", action="store_true",
                   help="check this installation (decoders, pipeline, annotations, Qt) and print a JSON "
                        "report; 'cxrviewer --self-test --help' for its options")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxrviewer`` console script."""
    multiprocessing.freeze_support()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        mod = SUBCOMMANDS[argv[0]]
        p = argparse.ArgumentParser(prog=f"cxrviewer {argv[0]}",
                                    description=getattr(mod, "DESCRIPTION", None) or mod.__doc__)
        p.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
        mod.add_arguments(p)
        args = p.parse_args(argv[1:])
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return int(mod.run(args))
    if "--self-test" in argv:  # handled before the GUI parser: it has options of its own
        from .selftest import main as _selftest

        return int(_selftest([a for a in argv if a != "--self-test"]))
    args = _gui_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from .gui.app import run_gui  # Qt only when the GUI is asked for

    return int(run_gui(args.paths, demo=args.demo, models_dir=args.models))


if __name__ == "__main__":
    sys.exit(main())
