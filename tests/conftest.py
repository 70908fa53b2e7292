"""Shared fixtures. `shared_data` finds ../shared/data (or $OPENMEDGEMMA_DATA).

Without it, tests that need it skip with a reason on a user's machine; with CI=true its
absence is a failure, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ci import in_ci

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path | None:
    env = os.environ.get("OPENMEDGEMMA_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for path in candidates:
        if (path / "README.md").is_file():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        reason = "shared data not found: set $OPENMEDGEMMA_DATA or place it at ../shared/data"
        if in_ci():
            pytest.fail(reason + " (CI=true: this is a failure, not a skip)")
        pytest.skip(reason)
    return path


@pytest.fixture
def no_network():
    """Network calls other than loopback fail and are recorded (see tests/netguard.py); the test fails at teardown
    if any was tried. Yields the guard: `no_network.attempts` lists what was tried."""
    from tests.netguard import network_blocked

    with network_blocked() as guard:
        yield guard
    assert not guard.attempts, f"network calls were attempted: {guard.attempts}"
