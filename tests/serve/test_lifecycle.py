"""Auth, binding, health while loading, client disconnects and SIGTERM draining, on live servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import ServerProcess

LONG = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 1500, "ignore_eos": True,
        "stream": True}  # fmt: skip


def test_api_key_guards_every_route_but_health():
    srv = ServerProcess("--api-key", "s3cret-key")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/version"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        r = httpx.post(srv.api + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
        import openai

        ok = openai.OpenAI(base_url=srv.api, api_key="s3cret-key", max_retries=0)
        assert ok.chat.completions.create(model="medgemma-nano", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).usage.completion_tokens >= 1  # fmt: skip
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.api, api_key="nope", max_retries=0).models.list()
    finally:
        srv.stop()


def test_key_from_the_environment():
    srv = ServerProcess(env={"OPENMEDGEMMA_API_KEY": "env-key"})
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer env-key"}).status_code == 200
    finally:
        srv.stop()


def test_non_loopback_bind_needs_a_key():
    out = subprocess.run([sys.executable, "-m", "openmedgemma.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"} | _env())  # fmt: skip
    assert out.returncode == 2 and "--api-key" in out.stderr and "listening" not in out.stdout


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OPENMEDGEMMA_API_KEY"}


def test_health_is_503_while_loading_then_200():
    """The app in process with a loader held back by an event: /health (and the model routes) say 503 until the
    models are in, then 200. nano loads too fast to catch this state from outside."""
    import threading

    import uvicorn

    from openmedgemma.cli import build_parser
    from openmedgemma.serve.app import ServerConfig, ServerState, create_app
    from openmedgemma.serve.cli import _bind, load

    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "2"])
    release = threading.Event()

    def loader(state):
        release.wait(60)
        load(state, args)

    state = ServerState(ServerConfig())
    sock = _bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(state, loader=loader), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        first = httpx.get(url + "/health", timeout=10)
        assert first.status_code == 503 and first.json()["error"]["message"] == "loading the model"
        assert first.headers["retry-after"] == "5"
        busy = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 120
        while not state.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        ok = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2}, timeout=60)  # fmt: skip
        assert ok.status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_client_disconnect_cancels_and_frees_the_slot(server):
    cancelled_before = server.metric('openmedgemma_requests_total{outcome="cancelled"}')
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.api + "/chat/completions", json=LONG) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert server.metric("openmedgemma_requests_running") == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("openmedgemma_requests_running") != 0:
        time.sleep(0.1)
    assert server.metric("openmedgemma_requests_running") == 0
    assert server.metric('openmedgemma_requests_total{outcome="cancelled"}') == cancelled_before + 1
    tokens = server.metric("openmedgemma_generation_tokens_total")
    time.sleep(0.5)
    assert server.metric("openmedgemma_generation_tokens_total") == tokens  # nothing generates any more


def test_sigterm_drains_in_flight_requests():
    srv = ServerProcess()
    body = dict(LONG, max_tokens=120)
    with httpx.stream("POST", srv.api + "/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        received = [next(lines)]
        srv.proc.send_signal(signal.SIGTERM)
        received += list(lines)
    events = [line[6:] for line in received if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finish = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if json.loads(e)["choices"]]
    assert finish[-1] == "length"  # all 120 tokens, not cut by the shutdown
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says "terminated by SIGTERM"
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Finished server process" in srv.proc.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)


def test_logs_carry_no_prompt_text():
    srv = ServerProcess()
    secret = "Patient John Q Public, MRN 99887766, born 1961-04-12"
    r = httpx.post(srv.api + "/chat/completions", json={"messages": [{"role": "user", "content": secret}],
                                                        "max_tokens": 4}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    bad = httpx.post(srv.api + "/chat/completions", json={"model": secret, "messages": [{"role": "user",
                     "content": "x"}]}, timeout=60)  # fmt: skip
    assert bad.status_code == 404
    log = srv.stop()
    assert "prompt tokens" in log and "chatcmpl-" in log  # the request is logged ...
    for fragment in ("John", "99887766", "1961-04-12"):
        assert fragment not in log  # ... but not what it said
