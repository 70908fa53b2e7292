"""The FastAPI app: routes, auth, limits and OpenAI-shaped errors. No model code lives here.

    state = ServerState(ServerConfig(api_key=...))   # models are attached by `load` (serve.cli)
    app = create_app(state)

/health answers 503 until the models are loaded, then 200; every other route needs the API key
when one is set (constant-time compare). Request bodies over `max_body_bytes` get 413 before they
are parsed. Errors are `{"error": {"message", "type", "param", "code"}}` as OpenAI's.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.serve.media import MediaLimits
from openmedgemma.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("openmedgemma.serve")


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 64 << 20
    max_images: int = 128  # per request, after series expansion (85 slices fit)
    max_tokens_cap: int | None = None  # None: the model's context
    media: MediaLimits = field(default_factory=MediaLimits)
    dicomweb: Any = None  # the imaging.dicomweb.DicomWebSource of `serve --dicomweb URL`, or None
    drain_seconds: float = 120.0


@dataclass
class ServedModel:
    name: str
    kind: str  # "chat" | "embedding"
    source: str
    bundled_nano: bool
    created: int = field(default_factory=lambda: int(time.time()))


class ServerState:
    """What the routes share: config, metrics, and (once loaded) the scheduler and embedder."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.engine = self.scheduler = self.embedder = None
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.load_error: str | None = None

    def model(self, name: str | None, kind: str) -> ServedModel:
        """The served model of `kind` named `name` (None: the only one); 404 otherwise."""
        candidates = [m for m in self.models.values() if m.kind == kind]
        if not candidates:
            raise APIError(404, f"this server serves no {kind} model", "model", "model_not_found", "NotFoundError")
        if name is None:
            return candidates[0]
        for m in candidates:
            if name == m.name:
                return m
        names = ", ".join(m.name for m in candidates)
        raise APIError(404, f"the model {name!r} does not exist here; served {kind} models: {names}", "model",
                       "model_not_found", "NotFoundError")  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_response(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state: ServerState, *, loader=None) -> FastAPI:
    """The app; `loader(state)` (blocking) runs in a thread at startup, so /health says 503 meanwhile."""

    @asynccontextmanager
    async def lifespan(app):
        import asyncio

        task = None
        if loader is not None:
            task = asyncio.get_running_loop().run_in_executor(None, _load, loader, state)
        yield
        if task is not None:
            await task
        if state.scheduler is not None:  # uvicorn has drained the connections; stop the thread
            await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop, True,
                                                             state.config.drain_seconds)  # fmt: skip

    app = FastAPI(title="openmedgemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_BodyLimit, max_bytes=state.config.max_body_bytes)
    _error_handlers(app)

    @app.get("/health")
    def health():
        if state.load_error:
            return error_response(503, f"loading failed: {state.load_error}", "server_error")
        if not state.ready:
            return error_response(503, "loading the model", "server_error", headers={"Retry-After": "5"})
        return {"status": "ok"}

    api = APIRouter(dependencies=[Depends(require_key)])

    @api.get("/version")
    def version():
        import torch

        from openmedgemma import __version__

        return {"version": __version__, "torch": torch.__version__,
                "models": {m.name: m.source for m in state.models.values()}}  # fmt: skip

    @api.get("/metrics")
    def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    def models():
        from openmedgemma.serve.protocol import ModelCard, ModelList

        return ModelList(data=[
            ModelCard(id=m.name, created=m.created,
                      openmedgemma={"kind": m.kind, "bundled_nano": m.bundled_nano, "source": m.source})
            for m in state.models.values()
        ])  # fmt: skip

    from openmedgemma.serve import chat, embeddings, page, preview

    api.include_router(chat.router)
    api.include_router(embeddings.router)
    api.include_router(preview.router)  # POST /v1/preview: what the model sees (the web page's)
    app.include_router(api)
    page.mount_page(app)  # the web page at / (no key needed to load it; it holds no data)
    return app


def require_key(request: Request) -> None:
    key = request.app.state.server.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", None,
                       "invalid_api_key", "authentication_error")  # fmt: skip


def ready_state(request: Request) -> ServerState:
    state = request.app.state.server
    if not state.ready:
        raise APIError(503, "the model is still loading; retry shortly", None, "loading", "server_error",
                       {"Retry-After": "5"})  # fmt: skip
    return state


def _load(loader, state: ServerState) -> None:
    try:
        loader(state)
        state.ready = True
    except Exception as err:  # reported by /health; the process keeps answering
        state.load_error = str(err)
        log.error("loading failed: %s", err)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(OpenMedGemmaError)
    async def user_error(request, err: OpenMedGemmaError):
        from openmedgemma.engine.scheduler import QueueFull

        if isinstance(err, QueueFull):
            return error_response(503, str(err), "server_error", None, "queue_full", {"Retry-After": "1"})
        return error_response(400, str(err), "invalid_request_error", getattr(err, "param", None), None)

    @app.exception_handler(RequestValidationError)
    async def validation(request, err: RequestValidationError):
        first: dict[str, Any] = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg', '')}", "invalid_request_error",
                                  None, "json_invalid")  # fmt: skip
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error",
                              param, first.get("type"))  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), "invalid_request_error")


class _BodyLimit:
    """413 for a request body over `max_bytes` (declared or streamed), before any route parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                chunks = None
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed and chunks is not None:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body larger than the limit of {self.max_bytes} bytes",
                                  "invalid_request_error", None, "body_too_large")  # fmt: skip
        await response(scope, receive, send)
