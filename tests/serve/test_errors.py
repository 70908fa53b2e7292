"""Every refusal is an OpenAI-shaped error with the right status, naming the field and the problem."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import ServerProcess
from tests.serve.test_chat import series_zip


def post(server, body=None, *, content=None, headers=None, path="/chat/completions"):
    return httpx.post(server.api + path, json=body, content=content, headers=headers, timeout=60)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def png_uri(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bomb_png() -> bytes:
    """A PNG whose header declares 100000 x 100000 pixels (30 GB decoded) in a few dozen bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_malformed_json(server):
    error = error_of(post(server, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert "malformed JSON" in error["message"]


def test_missing_and_wrong_fields_name_the_field(server):
    error = error_of(post(server, {"max_tokens": 4}), 400)
    assert error["param"] == "messages"
    error = error_of(post(server, {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}), 400)
    assert error["param"] == "temperature"


def test_unknown_model_is_404(server):
    error = error_of(post(server, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert "gpt-4" in error["message"] and "medgemma-nano" in error["message"] and error["code"] == "model_not_found"


def test_body_over_the_limit_is_413():
    # the default limit is 64 MB; a 1 MB server shows the same code path cheaply
    srv = ServerProcess("--max-body-mb", "1")
    try:
        big = user({"type": "text", "text": "x" * (2 << 20)})
        error = error_of(post(srv, big), 413)
        assert "1048576 bytes" in error["message"]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "url, needle",
    [
        ("https://example.org/cxr.png", "only data: URIs are accepted"),
        ("file:///etc/passwd", "only data: URIs are accepted"),
        ("data:image/png;base64,@@@@", "base64 is invalid"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:text/plain;base64," + base64.b64encode(b"just some text, not an image").decode(),
         "unsupported file type"),
        ("data:application/dicom;base64," + base64.b64encode(b"\0" * 128 + b"DICM" + b"\x02\x00garbage").decode(),
         "DICOM"),
        ("data:image/png;base64," + base64.b64encode(bomb_png()).decode(), "decompression bomb"),
        ("data:application/zip;base64," + base64.b64encode(b"PK\x03\x04broken").decode(), "not a readable zip"),
    ],
    ids=["http", "file", "bad-base64", "not-base64", "not-an-image", "corrupt-dicom", "bomb", "corrupt-zip"],
)
def test_bad_images_name_the_part(server, url, needle):
    error = error_of(post(server, user({"type": "text", "text": "what is it?"}, image(url))), 400)
    assert error["param"] == "messages[0].content[1].image_url"
    assert error["message"].startswith("messages[0].content[1].image_url: ") and needle in error["message"]


def test_too_many_images(server):
    error = error_of(post(server, user(*[image(png_uri()) for _ in range(129)])), 400)
    assert "more than 128 images" in error["message"]


def test_prompt_longer_than_the_context_names_both_lengths(server, shared_data):
    folder = shared_data / "dicom" / "pacsman_synthetic" / "dicomseries"
    error = error_of(post(server, user(image(series_zip(sorted(folder.iterdir()))))), 400)
    # 128 slices sampled to 85, 85 x (16 soft tokens + 2 markers) + labels > 2048
    assert "the prompt is 2" in error["message"] and "context is 2048 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    long_text = {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 1000}
    error = error_of(post(server, long_text), 400)
    assert "max_tokens is 1000" in error["message"] and "> the model's context of 2048" in error["message"]


def test_max_tokens_above_the_cap(server):
    error = error_of(post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}), 400)
    assert error["param"] == "max_tokens" and "100000" in error["message"] and "2048" in error["message"]


def test_bad_ct_preset_and_part_type(server):
    error = error_of(post(server, {**user({"type": "text", "text": "hi"}), "ct_preset": "bone"}), 400)
    assert error["param"] == "ct_preset" and "report-v4" in error["message"]
    error = error_of(post(server, user({"type": "input_audio", "input_audio": {}})), 400)
    assert "input_audio" in error["message"]


def test_queue_full_is_503_with_retry_after():
    srv = ServerProcess("--max-batch", "1", "--max-queue", "0")
    try:
        body = {"messages": [{"role": "user", "content": "Describe."}], "max_tokens": 300, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: post(srv, body), range(4)))
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and 503 in codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and error_of(refused, 503)["code"] == "queue_full"
    finally:
        srv.stop()
