"""The command line explains itself: every option of every command says what it does, with
words for its values, and `sfembed --version` answers."""

from __future__ import annotations

import argparse
import re

import pytest

import sfembed
from sfembed._cli import _parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    commands = {"sfembed": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update({f"sfembed {name}": sub for name, sub in action.choices.items()})
    return commands


@pytest.mark.parametrize("command", ["sfembed", "sfembed embed", "sfembed report", "sfembed serve"])
def test_every_option_says_what_it_does_with_a_word_for_its_value(command: str) -> None:
    parser = _commands()[command]
    assert parser.description, command
    assert "->" not in parser.description  # a user's description, not the code's
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions)
            continue
        text = (action.help or "").strip()
        name = "/".join(action.option_strings) or action.dest
        assert len(text) > 20, (command, name, text)
        assert not re.fullmatch(r"config key [\w.]+", text), (command, name)
        assert not text.startswith("config key"), (command, name)
        if action.option_strings and action.nargs != 0:  # takes a value: a word names it
            assert isinstance(action.metavar, str), (command, name)
            assert re.fullmatch(r"[A-Z]+", action.metavar), (command, name)
        if action.option_strings and not action.required:
            assert "default" in text, (command, name, text)


def test_the_top_level_help_describes_the_tool_with_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert "rate limits" in shown
    assert shown.count("sfembed embed ") >= 2  # two examples
    assert "asyncio" not in shown


def test_units_are_named_where_a_value_has_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "tokens per window; the window is --window-s seconds, 60 by default" in shown
    assert "(default: 500,000)" in shown
    for group in ("input:", "output:", "model:", "account limits:", "reliability:", "progress:"):
        assert group in shown


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sfembed {sfembed.__version__}"


def test_serve_says_how_long_a_stall_lasts(capsys: pytest.CaptureFixture[str]) -> None:
    from sfembed.testing import Faults

    assert main(["serve", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"held {Faults().stall_s:g} s" in printed  # the server's own stall, not a guess
