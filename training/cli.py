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

from .commands import init_bundle as _init_bundle

#: name -> module
COMMANDS = {
    "init-bundle": _init_bundle,
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
