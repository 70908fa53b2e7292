"""Whether the tests run in CI (CI=true, any case): there a missing prerequisite is a failure, never a skip."""

from __future__ import annotations

import os


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
