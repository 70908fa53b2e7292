"""The `openmedgemma` entry point: help, registration, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openmedgemma import cli
from openmedgemma.errors import OpenMedGemmaError


def test_help_lists_every_registered_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for module in cli.COMMAND_MODULES:
        assert module.startswith("openmedgemma.")
    assert "preview" in out and "deid" in out


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
