"""/v1/chat/completions through the official openai client and raw HTTP against a live server."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from openmedgemma.engine import GenerationConfig
from openmedgemma.eval.endpoint import data_uri

REPO = Path(__file__).resolve().parents[2]
CXR = REPO / "examples" / "cxr_nih_00000001_000.png"
CT = REPO / "examples" / "CT_small.dcm"
QUESTIONS = ["Is there cardiomegaly?", "What organ is shown?", "Is the liver normal?", "Describe the image.",
             "Is there a fracture?", "Is this an MRI?", "Is there an effusion?", "Where is the mass?"]  # fmt: skip


def ask_alone(engine, messages, max_tokens=32):
    """What `openmedgemma ask` answers: the in-process engine, one conversation alone, greedy."""
    [result] = engine.generate([messages], GenerationConfig(max_new_tokens=max_tokens))
    return result


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_plain_answer_equals_ask_with_usage(client, engine):
    messages = [{"role": "user", "content": "Is there cardiomegaly in this chest X-ray?"}]
    response = client.chat.completions.create(model="medgemma-nano", messages=messages, max_tokens=32, temperature=0)
    alone = ask_alone(engine, messages)
    choice = response.choices[0]
    assert choice.message.content == alone.text and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if alone.stop_reason == "stop_token" else "length")
    assert response.usage.prompt_tokens == alone.prompt_tokens
    assert response.usage.completion_tokens == alone.new_tokens
    assert response.usage.total_tokens == alone.prompt_tokens + alone.new_tokens
    assert response.model == "medgemma-nano" and response.id.startswith("chatcmpl-")


def test_stream_role_first_done_last_usage_chunk(server, client):
    messages = [{"role": "user", "content": "Describe a normal chest X-ray."}]
    plain = client.chat.completions.create(model="medgemma-nano", messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model="medgemma-nano", messages=messages, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    # raw SSE: `data:` lines, [DONE] last
    with httpx.stream("POST", server.api + "/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 8, "stream": True}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[-2][6:]) or json.loads(lines[-2][6:])["usage"] is None


def test_stop_string_cuts_the_answer(client):
    messages = [{"role": "user", "content": "What does the chest X-ray show?"}]
    full = client.chat.completions.create(model="medgemma-nano", messages=messages, max_tokens=40,
                                          extra_body={"ignore_eos": True}).choices[0].message.content  # fmt: skip
    assert len(full) >= 4
    stop = full[2:4]
    cut = client.chat.completions.create(model="medgemma-nano", messages=messages, max_tokens=40, stop=[stop],
                                         extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    assert cut.message.content == full[: full.index(stop)].strip() and cut.finish_reason == "stop"


def test_seeds_are_reproducible_and_n_choices_differ(client):
    kwargs = dict(model="medgemma-nano", messages=[{"role": "user", "content": "Describe the image findings."}],
                  max_tokens=24, temperature=1.5, extra_body={"ignore_eos": True})  # fmt: skip
    a = client.chat.completions.create(seed=7, n=3, **kwargs)
    b = client.chat.completions.create(seed=7, n=3, **kwargs)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert a.usage.completion_tokens == 3 * 24


def test_logprobs(client):
    response = client.chat.completions.create(model="medgemma-nano", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})  # fmt: skip
    items = response.choices[0].logprobs.content
    assert len(items) == 5
    for item in items:  # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob


@pytest.mark.parametrize("path", [CXR, CT], ids=["png", "dicom"])
def test_image_answers_equal_ask(client, engine, path):
    question = "What does this image show?"
    response = client.chat.completions.create(model="medgemma-nano", max_tokens=32, messages=[
        {"role": "user", "content": [image_part(data_uri(path)), {"type": "text", "text": question}]}])  # fmt: skip
    alone = ask_alone(engine, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                            {"type": "text", "text": question}]}])  # fmt: skip
    assert response.choices[0].message.content == alone.text
    assert response.usage.prompt_tokens == alone.prompt_tokens


def series_zip(files) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for p in files:
            archive.writestr(f"study/{p.name}", p.read_bytes())
    return "data:application/zip;base64," + base64.b64encode(buf.getvalue()).decode()


def test_zipped_series_gives_the_volume_layout(client, engine, shared_data):
    from openmedgemma.imaging.series import load_series, volume_messages

    folder = shared_data / "dicom" / "pacsman_synthetic" / "dicomseries"
    files = sorted(folder.iterdir())[::3]  # 43 of the 128 slices: nano's 2048-token context holds them
    instruction, question = "You are given slices of an MR volume.", "Is there a lesion?"
    response = client.chat.completions.create(model="medgemma-nano", max_tokens=16, messages=[{"role": "user",
        "content": [{"type": "text", "text": instruction}, image_part(series_zip(files)),
                    {"type": "text", "text": question}]}])  # fmt: skip
    local = [{"role": "user", "content": volume_messages(load_series(files), instruction, question)}]
    alone = ask_alone(engine, local, 16)
    assert sum(1 for item in local[0]["content"] if item["type"] == "image") == 43
    assert response.usage.prompt_tokens == alone.prompt_tokens
    assert response.choices[0].message.content == alone.text


def test_32_concurrent_requests_equal_sequential_answers(server, client, engine):
    cxr = data_uri(CXR)
    convs = []
    for i in range(32):
        q = QUESTIONS[i % len(QUESTIONS)] + " " * (i // 8)  # different lengths: rows join and leave at other steps
        convs.append([{"role": "user", "content": [image_part(cxr), {"type": "text", "text": q}]}] if i % 2 else
                     [{"role": "user", "content": q}])  # fmt: skip
    sizes = []

    def one(i):
        r = client.chat.completions.create(model="medgemma-nano", messages=convs[i], max_tokens=12 + i % 9,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        sizes.append(server.metric("openmedgemma_requests_running"))
        return r.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    batch_hist = server.metric("openmedgemma_batch_size_sum") / max(1.0, server.metric("openmedgemma_batch_size_count"))
    assert batch_hist > 1.5, "requests were not batched"
    local = []
    for i, conv in enumerate(convs):
        messages = [{"role": "user", "content": [{"type": "image", "image": str(CXR)}, conv[0]["content"][1]]}] \
            if i % 2 else conv  # fmt: skip
        local.append(engine_text_ignoring_eos(engine, messages, 12 + i % 9))
    assert answers == local


def engine_text_ignoring_eos(engine, messages, n):
    """The server's ignore_eos answer computed alone through the scheduler's batch-1 path."""
    import threading

    from openmedgemma.engine.scheduler import Scheduler
    from openmedgemma.engine.sequences import Finished, Request

    if not hasattr(engine, "_solo"):
        engine._solo = Scheduler(engine, max_batch=1, prefix_cache_bytes=0).start()
    done, event = [], threading.Event()

    def on_event(e):
        if isinstance(e, Finished):
            done.append(e)
            event.set()

    engine._solo.submit(Request(engine.prepare(messages), GenerationConfig(max_new_tokens=n), on_event,
                                ignore_eos=True))  # fmt: skip
    event.wait(60)
    return done[0].result.text
