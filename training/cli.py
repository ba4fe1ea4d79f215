"""``cxr-train``: sub-commands that build data, train models and write bundles.

Each sub-command is a module in :mod:`training.commands` with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported
explicitly below so frozen builds find them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .commands import cache as _cache
from .commands import align as _align
from .commands import canonical as _canonical
from .commands import card as _card
from .commands import cia as _cia
from .commands import classify as _classify
from .commands import disease_masks as _disease_masks
from .commands import evaluate as _evaluate
from .commands import init_bundle as _init_bundle
from .commands import localiser as _localiser
from .commands import mine as _mine
from .commands import segment as _segment
from .commands import phantoms as _phantoms

#: name -> module
COMMANDS = {
    "init-bundle": _init_bundle,
    "phantoms": _phantoms,
    "cache": _cache,
    "classify": _classify,
    "canonical": _canonical,
    "align": _align,
    "cia": _cia,
    "segment": _segment,
    "evaluate": _evaluate,
    "card": _card,
    "localiser": _localiser,
    "disease-masks": _disease_masks,
    "mine": _mine,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-train", description=__doc__)
    p.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)
    for name, mod in COMMANDS.items():
        sp = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None,
                            description=mod.__doc__)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given (recorded by evaluate in metrics.json)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
