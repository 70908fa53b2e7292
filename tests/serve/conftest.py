"""A real `openmedgemma serve` process on 127.0.0.1 (a free port), talked to over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`openmedgemma serve --port 0 ARGS` until the models are loaded (/health 200)."""

    def __init__(self, *args: str, env: dict | None = None, ready: bool = True):
        cmd = [sys.executable, "-m", "openmedgemma.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # fmt: skip
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = match.group(1)
        self.api = self.url + "/v1"
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers or {}, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> str:
        """SIGTERM, wait, and return stderr (the server log)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stderr.read()


@pytest.fixture(scope="session")
def server():
    """The default server: bundled nano MedGemma + MedSigLIP, 16 rows."""
    srv = ServerProcess("--max-batch", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def engine():
    """The same nano model in process: what `openmedgemma ask` runs."""
    from openmedgemma.bundled import nano_path
    from openmedgemma.engine import Engine

    return Engine.from_pretrained(nano_path("medgemma"))
