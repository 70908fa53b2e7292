"""/v1/embeddings against MedSigLIP in process; OpenAI tools <-> Gemma function calling."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openmedgemma.eval.endpoint import data_uri
from openmedgemma.serve import tools
from tests.serve.test_chat import CT, CXR


@pytest.fixture(scope="module")
def siglip():
    from openmedgemma.bundled import nano_path
    from openmedgemma.imaging import load_image, to_pixel_values
    from openmedgemma.model.medsiglip import MedSigLIP
    from openmedgemma.tokenizer.siglip import SiglipTextTokenizer

    model = MedSigLIP.from_pretrained(nano_path("medsiglip"))
    tok = SiglipTextTokenizer.from_pretrained(nano_path("medsiglip"), max_length=model.config.text.max_position_embeddings)

    def image(path):
        with torch.no_grad():
            px = to_pixel_values([load_image(path)], size=model.config.vision.image_size)
            return F.normalize(model.get_image_features(px), dim=-1)[0].numpy()

    def text(s):
        with torch.no_grad():
            return F.normalize(model.get_text_features(tok([s])), dim=-1)[0].numpy()

    return image, text


def test_text_and_image_embeddings_equal_medsiglip(client, siglip):
    image, text = siglip
    inputs = ["a chest x-ray with cardiomegaly", data_uri(CXR), data_uri(CT), "normal"]
    response = client.embeddings.create(model="medsiglip-nano", input=inputs)
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    want = np.stack([text(inputs[0]), image(CXR), image(CT), text(inputs[3])])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert [d.index for d in response.data] == [0, 1, 2, 3] and response.usage.prompt_tokens > 0
    single = client.embeddings.create(model="medsiglip-nano", input="normal", encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, want[3], atol=1e-5)


def test_embedding_errors(server):
    r = httpx.post(server.api + "/embeddings", json={"input": [1, 2, 3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(server.api + "/embeddings", json={"model": "medgemma-nano", "input": "x"})
    assert r.status_code == 404  # a chat model is no embedding model
    r = httpx.post(server.api + "/embeddings", json={"input": ["ok", "data:image/png;base64,AAAA"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"


WEATHER = [{"type": "function", "function": {"name": "get_lab_result", "description": "latest lab value",
            "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]


@pytest.mark.parametrize("answer, content, calls", [
    ('```tool_code\n{"name": "get_lab_result", "arguments": {"code": "2345-7"}}\n```', None,
     [("get_lab_result", {"code": "2345-7"})]),
    ('Let me check.\n```tool_code\n[{"name": "get_lab_result", "parameters": {"code": "a"}},'
     ' {"name": "get_lab_result", "arguments": {"code": "b"}}]\n```', "Let me check.",
     [("get_lab_result", {"code": "a"}), ("get_lab_result", {"code": "b"})]),
    ('{"name": "get_lab_result", "arguments": {"code": "x"}}', None, [("get_lab_result", {"code": "x"})]),
    ('[get_lab_result(code="4548-4")]', None, [("get_lab_result", {"code": "4548-4"})]),
    ('The glucose is 5.4 mmol/L.', "The glucose is 5.4 mmol/L.", []),
    ('```tool_code\n{"name": "delete_records", "arguments": {}}\n```', None, []),  # not an offered tool
], ids=["fenced", "parallel", "bare-json", "pythonic", "text", "unknown-tool"])
def test_parse_tool_calls(answer, content, calls):
    text, parsed = tools.parse_tool_calls(answer, [WEATHER[0]["function"]])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == calls
    if calls:
        assert text == content and all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed)
    else:
        assert text == answer


def test_tool_conversation_round_trips_through_the_server(client, engine):
    """An assistant tool call and its result are rendered into Gemma turns the server accepts; the prompt is
    exactly tools.render_messages' rendering (checked by its token count against the engine)."""
    messages = [
        {"role": "user", "content": "What is the patient's latest creatinine?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_lab_result", "arguments": '{"code": "2160-0"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"value": 1.1, "unit": "mg/dL"}'},
    ]
    response = client.chat.completions.create(model="medgemma-nano", messages=messages, tools=WEATHER, max_tokens=8)
    rendered = tools.render_messages([dict(m) for m in messages], [WEATHER[0]["function"]], None)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    text = json.dumps(rendered)
    assert "```tool_code" in text and "```tool_output" in text and "You have access to the functions" in text
    assert response.usage.prompt_tokens == len(engine.prepare(rendered).ids)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="medgemma-nano", messages=messages[:1], tools=WEATHER,
                                          tool_choice="none", max_tokens=4)  # fmt: skip
    assert none.usage.prompt_tokens == len(engine.prepare(messages[:1]).ids)  # tools not shown at all


def test_tool_choice_errors(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": WEATHER}
    r = httpx.post(server.api + "/chat/completions", json={**body, "tool_choice": {"type": "function",
                                                                                     "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(server.api + "/chat/completions", json={**body, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0]"
