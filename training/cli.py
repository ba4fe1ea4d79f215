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
from .commands import compare as _compare
from .commands import disease_masks as _disease_masks
from .commands import evaluate as _evaluate
from .commands import init_bundle as _init_bundle
from .commands import localiser as _localiser
from .commands import mine as _mine
from .commands import segment as _segment
from .commands import phantoms as _phantoms
from .config_files import add_config_argument, apply_config_or_exit, config_path, resolved_config

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
    "compare": _compare,
    "localiser": _localiser,
    "disease-masks": _disease_masks,
    "mine": _mine,
}


#: what ``cxr-train --help`` says
DESCRIPTION = """Build training data, train the models of the cxrviewer app and evaluate them. Every
command writes what the app loads: model bundles (NAME.cxrbundle folders), the canonical chest,
the anatomy-guided localiser, or evaluation tables. Training commands save a checkpoint every
epoch in OUT.run/ (rerun the same command to resume) and run on the GPU when there is one.
Every command reads its options from --config FILE.yaml|.json too (flags override it); training runs
write the resolved config to OUT.run/config.yaml and the bundle. 'cxr-train COMMAND --help'
lists a command's options and their defaults."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and adds "(default: X)" to every option whose help
    does not already say its default (None and off switches have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (text is None or "default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _first_sentence(text: str) -> str:
    """The first sentence of ``text`` on one line (the command list of ``cxr-train --help``)."""
    flat = " ".join(text.split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr-train`` parser with one sub-parser per command."""
    p = argparse.ArgumentParser(prog="cxr-train", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        sp = sub.add_parser(name, help=_first_sentence(mod.DESCRIPTION), description=mod.DESCRIPTION,
                            epilog="examples:\n" + mod.EXAMPLES, formatter_class=HelpFormatter)
        mod.add_arguments(sp)
        add_config_argument(sp)
        sp.set_defaults(_run=mod.run)
    return p


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """command name -> its sub-parser."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    subparsers = _subparsers(parser)
    command, config = config_path(argv, list(COMMANDS))
    if command is not None and config is not None:
        apply_config_or_exit(subparsers[command], command, config)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and args.config != config:  # a form the first look missed
        apply_config_or_exit(subparsers[args.command], args.command, args.config)
        args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (recorded by evaluate in metrics.json)
    # every option's final value: written to the run folder and the bundle's provenance.config
    args.resolved_config = resolved_config(subparsers[args.command], args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
