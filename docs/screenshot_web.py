"""Regenerates docs/web_page.png: the web page answering about examples/cxr_nih_00000001_000.png.

    python docs/screenshot_web.py [--model DIR] [--out docs/web_page.png]

Starts `openmedgemma serve --port 0` (the bundled nano unless --model) on 127.0.0.1, drives Debian's
chromium headless through Playwright (as tests/serve/test_web.py does), attaches the X-ray, asks,
waits for the whole answer, and saves a 1400x900 screenshot. Greedy decoding: the same model gives
the same picture.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Is there cardiomegaly?"


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "openmedgemma.cli", "serve", "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    match = re.search(r"listening on (http://\S+)", process.stdout.readline())
    if not match:
        process.kill()
        sys.exit("screenshot_web: openmedgemma serve did not start")
    url = match.group(1)
    deadline = time.monotonic() + 180
    while True:  # the models load after the socket is bound
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                sys.exit("screenshot_web: the server never became healthy")
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder to serve (default: the bundled nano)")
    parser.add_argument("--out", default=str(REPO / "docs" / "web_page.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    process, url = start_server(["--model", args.model] if args.model else [])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                                 headless=True)  # fmt: skip
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            page.wait_for_selector("#model option", state="attached")
            page.fill("#system-prompt", "You are an expert radiologist.")
            page.set_input_files("#file-input", str(REPO / "examples" / "cxr_nih_00000001_000.png"))
            page.wait_for_selector("#attachments img.preview:not([hidden])")
            page.fill("#prompt", QUESTION)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".message.assistant[data-state='done']", timeout=120_000)
            page.fill("#prompt", "What else do you see?")  # show the composer in use
            page.screenshot(path=args.out)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"screenshot_web: wrote {args.out}")


if __name__ == "__main__":
    main()
