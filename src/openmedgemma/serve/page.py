"""The web page: `/` serves web/index.html, `/static/...` the rest of web/ (scripts, styles, vendored libs).

No API key guards these (the page must load to ask for the key); they hold no data. The page
loads nothing from anywhere else, and its Content-Security-Policy says so to the browser: scripts
only from this server and no inline script, so even a sanitiser miss cannot run injected code, and
images only from here or data: URIs, so model output cannot make the browser call out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount_page(app: FastAPI) -> None:
    """Add the page to `app`; call it after the API routes so that they keep precedence."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
