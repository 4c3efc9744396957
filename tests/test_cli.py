"""The CLI dispatch table covers every registered subcommand."""

from __future__ import annotations

import argparse
import importlib

from metalign.cli import COMMANDS, build_parser, main


def test_every_command_is_registered_by_its_module():
    for command, module in COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        importlib.import_module(module).register(sub)
        assert command in sub.choices, f"{module} does not register {command}"


def test_help_lists_all_commands(capsys):
    parser = build_parser()
    assert set(COMMANDS) <= set(parser._subparsers._group_actions[0].choices)


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    code = main(["manifest", "--layout", "flat", "--root", str(tmp_path / "nope"), "--split", "x",
                 "--out", str(tmp_path / "m.csv")])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
