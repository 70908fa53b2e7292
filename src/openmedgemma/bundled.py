"""The bundled nano models: what `ask`, `chat` and `eval` use when no `--model` is given.

`models/medgemma-nano` and `models/medsiglip-nano` in the source checkout (trained by
`openmedgemma train nano`; see models/README.md), or the folder `$OPENMEDGEMMA_MODELS` names. They are tiny
demonstration models, not for clinical use, and commands say so once when they fall back to them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from openmedgemma.errors import ConfigError

NANO = {"medgemma": "medgemma-nano", "medsiglip": "medsiglip-nano"}
_announced: set[str] = set()


def models_dir() -> Path:
    env = os.environ.get("OPENMEDGEMMA_MODELS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "models"


def nano_path(kind: str = "medgemma") -> Path:
    """The bundled nano model folder of `kind` ("medgemma" or "medsiglip"); a clear error when it is missing."""
    folder = models_dir() / NANO[kind]
    if not (folder / "config.json").is_file():
        raise ConfigError(f"no --model given and the bundled nano model is not at {folder}; pass --model PATH (a "
                          "checkpoint folder), set OPENMEDGEMMA_MODELS, or train it: openmedgemma train nano")  # fmt: skip
    return folder


def model_or_nano(path: str | os.PathLike | None, kind: str, command: str) -> Path:
    """`path` when given, else the bundled nano model of `kind`, announced once per process on stderr."""
    if path:
        return Path(path).expanduser()
    folder = nano_path(kind)
    if kind not in _announced:
        _announced.add(kind)
        print(f"{command}: no --model given; using the bundled {NANO[kind]} ({folder}), a tiny demonstration model "
              "trained on public data, not for clinical use", file=sys.stderr)  # fmt: skip
    return folder
