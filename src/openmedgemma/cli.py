"""The `openmedgemma` command. Each part of the system registers its own sub-commands.

A part adds a module to COMMAND_MODULES exposing `register(subparsers)`; it must keep its
top-level imports light (no torch) so that `--help` is instant. Errors derived from
OpenMedGemmaError are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from openmedgemma.errors import OpenMedGemmaError

COMMAND_MODULES = [
    "openmedgemma.imaging.cli",
    "openmedgemma.imaging.pacs_cli",
    "openmedgemma.eval.cli",
    "openmedgemma.engine.cli",
    "openmedgemma.train.cli",
    "openmedgemma.ehr.cli",
    "openmedgemma.serve.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmedgemma",
        description="Run, adapt and evaluate MedGemma / MedSigLIP models locally. No network access.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except OpenMedGemmaError as err:
        print(f"openmedgemma {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
