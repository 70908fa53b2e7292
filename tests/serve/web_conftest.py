"""Fixtures for the web page's browser tests: a real `openmedgemma serve` on 127.0.0.1 with the bundled
nano models, and headless Chromium from Debian's `chromium` package driven by Playwright.

Imported by test_web.py (not a conftest.py, so that it cannot clash with the server's own fixtures).
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LISTENING = re.compile(r"openmedgemma serve: listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None
    stdout: list[str] = field(default_factory=list)

    def get(self, path: str) -> str:
        request = urllib.request.Request(self.url + path)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def gauge(self, name: str) -> float:
        """A gauge from /metrics (summed over its label sets)."""
        values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", self.get("/metrics"), re.M)
        assert values, f"{name} not in /metrics"
        return sum(float(v) for v in values)

    def wait_gauge(self, name: str, value: float, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.gauge(name)) != value:
            assert time.monotonic() < deadline, f"{name} stayed {current}, expected {value} within {timeout}s"
            time.sleep(0.1)


def start_server(*extra: str, timeout: float = 180.0) -> Server:
    """`openmedgemma serve --port 0` (bundled nano) in a subprocess; returns once /health says ready."""
    log = Path(tempfile.mkstemp(prefix="openmedgemma-serve-", suffix=".log")[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OPENMEDGEMMA_API_KEY", None)
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "openmedgemma.cli", "serve", "--host", "127.0.0.1", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO_ROOT,
        )
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:  # read stdout to its end so that the server never blocks on a full pipe
        for line in process.stdout:
            lines.append(line)
            if not url and (match := LISTENING.search(line)):
                url.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout) or not url:
        process.kill()
        process.wait()
        pytest.fail(f"openmedgemma serve did not start: stdout {lines!r}, stderr:\n{log.read_text()[-3000:]}")
    server = Server(url=url[0], process=process, log=log, stdout=lines)
    deadline = time.monotonic() + timeout  # the socket is bound before the models load: wait for /health
    while True:
        try:
            urllib.request.urlopen(server.url + "/health", timeout=5).close()
            return server
        except OSError:  # 503 (HTTPError) while loading, or not answering yet
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = log.read_text()[-3000:]
                stop_server(server)
                pytest.fail(f"openmedgemma serve never became healthy:\n{stderr}")
            time.sleep(0.2)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def web_server():
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        reason = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: this is a failure, not a skip)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download cannot work offline: drive the system's chromium.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@dataclass
class Page:
    """A fresh browser context (empty storage) on the page, with what it did recorded."""

    page: object
    server: Server
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("body[data-ready='true']")


def new_page(browser, server: Server) -> tuple[object, Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    handle = Page(page=page, server=server)
    page.on("request", lambda request: handle.requests.append(request.url))
    page.on("pageerror", lambda error: handle.errors.append(str(error)))

    def dialog(d) -> None:  # an alert() from injected script would land here
        handle.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    return context, handle


@pytest.fixture
def web(browser, web_server):
    context, handle = new_page(browser, web_server)
    handle.open()
    handle.page.wait_for_selector("#model option", state="attached")
    yield handle
    context.close()
    assert not handle.errors, f"JavaScript errors on the page: {handle.errors}"
    assert not handle.dialogs, f"dialogs opened by the page: {handle.dialogs}"


def ct_series_zip(slices: int = 4) -> bytes:
    """A zipped DICOM series: examples/CT_small.dcm restacked as `slices` slices 5 mm apart."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(EXAMPLES / "CT_small.dcm")
    series_uid = generate_uid()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(slices):
            ds = copy.deepcopy(source)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = index + 1
            x, y, z = (float(v) for v in source.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 5.0 * index]
            pixels = ds.pixel_array.astype(np.int16) + np.int16(40 * index)  # slices that differ
            ds.PixelData = pixels.tobytes()
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            archive.writestr(f"series/slice{index:03d}.dcm", out.getvalue())
    return buffer.getvalue()


def corrupt_dicom() -> bytes:
    """examples/CT_small.dcm cut in the middle of its pixel data: a DICOM header, then too few pixels."""
    data = (EXAMPLES / "CT_small.dcm").read_bytes()
    return data[: len(data) - 20000]
