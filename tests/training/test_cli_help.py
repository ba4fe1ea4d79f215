"""``cxr-train --help`` and every ``cxr-train COMMAND --help`` are written for users (issue 14)."""
from __future__ import annotations

import argparse

import pytest

from training.cli import COMMANDS, build_parser

DEVELOPER_MARKUP = (":mod:", ":class:", ":func:", "``")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _check_user_help(p: argparse.ArgumentParser) -> str:
    text = p.format_help()
    for mark in DEVELOPER_MARKUP:
        assert mark not in text, (p.prog, mark)
    desc = (p.description or "").strip()
    assert desc and desc[-1] in ".)", (p.prog, desc[-60:])  # full sentences, never cut mid-sentence
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help, (p.prog, a.option_strings)  # every option says what it does
    return text


def test_program_help(parser):
    text = _check_user_help(parser)
    assert "frozen builds" not in text
    for name in COMMANDS:
        assert name in text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line summaries end a sentence too
                assert choice.help and choice.help.rstrip()[-1] in ".)", choice.dest


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help(parser, name):
    sp = _subparsers(parser)[name]
    text = _check_user_help(sp)
    assert "examples:" in text and f"cxr-train {name}" in text


def test_classify_help_shows_defaults(parser):
    text = " ".join(_subparsers(parser)["classify"].format_help().split())
    for expected in ("learning rate (default: 0.0001)", "(default: 5)", "(default: 16)", "(default: adam)",
                     "(default: auto)", "(default: 256)"):
        assert expected in text, expected


def test_defaults_shown_are_the_real_ones(parser):
    """cia trains at 512 px by default (set_defaults): its help must say so, not the shared 256."""
    text = " ".join(_subparsers(parser)["cia"].format_help().split())
    assert "input size in pixels (default: 512)" in text and "(default: 0.001)" in text


def test_main_help_exits_zero(capsys):
    from training.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["classify", "--help"])
    assert exc.value.code == 0
    assert "default: 0.0001" in capsys.readouterr().out
