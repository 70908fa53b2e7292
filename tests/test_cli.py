"""The `openmedgemma` entry point: help, registration, and one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from openmedgemma import cli
from openmedgemma.errors import OpenMedGemmaError


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every registered command and sub-command (e.g. ("train", "sft")), from the parsers themselves."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += _command_paths(sub, prefix + (name,))
    return paths


def test_help_lists_every_registered_command_and_each_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    paths = _command_paths(cli.build_parser())
    commands = [p[0] for p in paths if len(p) == 1]
    # every module registers at least one command; these are the commands the README documents
    assert len(commands) >= len(cli.COMMAND_MODULES)
    assert {"preview", "deid", "eval", "ask", "chat", "train"} <= set(commands)
    assert any(len(p) == 2 for p in paths)  # sub-commands (train STAGE) are walked too
    for path in paths:
        if len(path) == 1:
            assert f"    {path[0]} " in top or f"    {path[0]}\n" in top, f"{path[0]} missing from --help"
        with pytest.raises(SystemExit) as exit_:
            cli.main([*path, "--help"])
        assert exit_.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith(f"usage: openmedgemma {' '.join(path)}"), (path, out[:200])
        assert "-h, --help" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 1
    assert "usage: openmedgemma" in capsys.readouterr().out


def test_user_errors_are_one_line_with_status_2(monkeypatch, capsys):
    def boom(args):
        raise OpenMedGemmaError("/data/x.dcm: not a DICOM file")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.add_parser("boom").set_defaults(func=boom)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err == "openmedgemma boom: error: /data/x.dcm: not a DICOM file\n"


def test_help_does_not_import_torch():
    code = "import sys; from openmedgemma import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
