"""`serve` makes no network call: the whole server runs in this process under tests/netguard.py (a subprocess
would not be covered), from loading the models to answering a streamed image question and embeddings."""

from __future__ import annotations

import threading
import time

import httpx
import openai

from openmedgemma.cli import build_parser
from openmedgemma.eval.endpoint import data_uri
from tests.serve.test_chat import CXR


def test_serve_tries_no_network(no_network):
    import uvicorn

    from openmedgemma.serve.app import ServerConfig, ServerState, create_app
    from openmedgemma.serve.cli import _bind, load

    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "4"])
    state = ServerState(ServerConfig())
    sock = _bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(state, loader=lambda s: load(s, args)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not state.ready:
            time.sleep(0.1)
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="medgemma-nano", max_tokens=8, stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(CXR)}},
                                         {"type": "text", "text": "Any effusion?"}]}])  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert len(client.embeddings.create(model="medsiglip-nano", input=["effusion"]).data[0].embedding) > 0
        assert httpx.get(url + "/").status_code == 200  # the web page loads nothing from elsewhere (CSP: 'self')
    finally:
        server.should_exit = True
        thread.join(30)
    assert no_network.attempts == []
