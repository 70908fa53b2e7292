"""Volumes and slide cases through the engine: many-image parity with transformers, the context limit
(how many slices fit), vision-tower batches, the feature cache by pixel content and by bytes, and
`MedGemma.chat` with a volume in the content. The model is the bundled nano (64 px images, 16 soft
tokens, a 2048-token context), so the real 128-slice series runs in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from openmedgemma import MedGemma
from openmedgemma.config import FULL, SLIDING
from openmedgemma.engine import Engine, GenerationConfig, generate_ids
from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.imaging.inputs import volume_input
from openmedgemma.model.masks import decoder_masks
from openmedgemma.tokenizer import Tokenizer

NANO = Path(__file__).resolve().parents[2] / "models" / "medgemma-nano"
INSTRUCTION = "You are reviewing the slices of one MR volume, each followed by its label SLICE n."
QUESTION = "Which slices show the phantom?"


@pytest.fixture(scope="module")
def nano():
    return MedGemma.from_pretrained(NANO), Tokenizer.from_pretrained(NANO)


def volume_messages(series, max_slices: int) -> list[dict]:
    content = volume_input(series, max_slices=max_slices).content
    text = [{"type": "text", "text": INSTRUCTION}, *content, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": text}]


def test_volume_prompt_generates_what_transformers_generates(nano, pacsman_series):
    """40 slices (40 images, ~1,100 tokens): ids, pixels and 24 greedy tokens equal transformers'
    processor + generate, also with a prefill chunked into pieces smaller than a few slices."""
    model, tok = nano
    messages = volume_messages(pacsman_series, 40)
    prompt = Engine(model, tok).prepare(messages)
    assert len(prompt.pixels) == 40

    processor = transformers.AutoProcessor.from_pretrained(NANO)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(NANO, dtype=torch.float32).eval()
    hf_messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.fromarray(item["image"])} if item["type"] == "image" else
        {"type": "text", "text": item["text"]} for item in messages[0]["content"]]}]  # fmt: skip
    inputs = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    assert prompt.ids == inputs["input_ids"][0].tolist()
    from openmedgemma.imaging.pixel_values import normalize_pixels

    torch.testing.assert_close(normalize_pixels(torch.stack(prompt.pixels)), inputs["pixel_values"], atol=0, rtol=0)
    with torch.no_grad():
        ref = hf.generate(**inputs, do_sample=False, max_new_tokens=24, min_new_tokens=24, eos_token_id=None,
                          pad_token_id=tok.pad_id)[0, len(prompt.ids):].tolist()  # fmt: skip
    config = GenerationConfig(max_new_tokens=24)
    pixels = torch.stack(prompt.pixels)
    for chunk in (2048, 50):
        assert generate_ids(model, [prompt.ids], [pixels], config, prefill_chunk=chunk)[0] == ref


def test_too_many_slices_for_the_context_says_how_many_fit(nano, pacsman_series):
    model, tok = nano
    engine = Engine(model, tok)
    with pytest.raises(OpenMedGemmaError) as err:
        engine.prepare(volume_messages(pacsman_series, 85))
    message = str(err.value)
    assert message.startswith(f"{pacsman_series}: 85 slices make a prompt of ") and "context is 2,048" in message
    fit = int(message.split("at most ")[1].split(" slices fit")[0])
    assert len(engine.prepare(volume_messages(pacsman_series, fit)).ids) < 2048
    with pytest.raises(OpenMedGemmaError, match="slices fit"):
        engine.prepare(volume_messages(pacsman_series, fit + 1))


def test_vision_tower_runs_in_batches_and_the_cache_is_keyed_by_pixels(nano, pacsman_series, monkeypatch):
    model, tok = nano
    calls = []
    original = model.image_features
    monkeypatch.setattr(model, "image_features", lambda px: calls.append(len(px)) or original(px))
    engine = Engine(model, tok, vision_batch=4)
    messages = volume_messages(pacsman_series, 10)
    config = GenerationConfig(max_new_tokens=3)
    first = engine.generate([messages], config)[0]
    assert calls == [4, 4, 2] and engine.vision_calls == 10
    assert first.inputs == []  # items expanded by the caller: nothing left for the engine to report
    # the same slices as fresh arrays, another question: no vision-tower call, same features
    again = volume_messages(pacsman_series, 10)
    again[0]["content"][-1] = {"type": "text", "text": "Anything else?"}
    engine.generate([again], config)
    assert calls == [4, 4, 2]
    unbatched = Engine(model, tok, vision_batch=10, image_cache_size=0)
    assert unbatched.generate([messages], config)[0].token_ids == first.token_ids


def test_feature_cache_is_bounded_in_bytes(nano, pacsman_series):
    model, tok = nano
    per_image = model.config.mm_tokens_per_image * model.config.text.hidden_size * 4  # fp32
    engine = Engine(model, tok, image_cache_bytes=3 * per_image)
    engine.generate([volume_messages(pacsman_series, 8)], GenerationConfig(max_new_tokens=2))
    assert len(engine._features) == 3 and engine._cache_nbytes == 3 * per_image


def test_medgemma_chat_takes_a_volume_item(pacsman_series):
    model = MedGemma.from_pretrained(NANO)
    content = [{"type": "text", "text": INSTRUCTION},
               {"type": "volume", "volume": str(pacsman_series), "max_slices": 6},
               {"type": "text", "text": QUESTION}]  # fmt: skip
    from openmedgemma.engine.engine import engine_for

    result = engine_for(model).chat([{"role": "user", "content": content}], max_new_tokens=4, return_result=True)
    assert result.inputs[0]["slices"] == 6 and result.inputs[0]["kind"] == "volume"
    expected = Engine(model, Tokenizer.from_pretrained(NANO)).chat(volume_messages(pacsman_series, 6),
                                                                    max_new_tokens=4)  # fmt: skip
    assert result.text == expected == model.chat([{"role": "user", "content": content}], max_new_tokens=4)
    assert result.to_dict()["inputs"][0]["total_slices"] == 128


def test_masks_without_int64_differences_are_unchanged():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 60, (2, 7), generator=g)
    k = torch.cat([torch.full((2, 3), -1), torch.randint(0, 60, (2, 30), generator=g)], 1)
    qb = torch.randint(-1, 2, (2, 7), generator=g)
    kb = torch.randint(-1, 2, (2, 33), generator=g)
    valid = k >= 0
    got = decoder_masks(q, k, 8, qb, kb, valid)
    diff = q[:, :, None] - k[:, None, :]
    causal = ((diff >= 0) | ((qb[:, :, None] >= 0) & (qb[:, :, None] == kb[:, None, :]))) & valid[:, None, :]
    assert torch.equal(got[FULL], causal[:, None]) and torch.equal(got[SLIDING], (causal & (diff < 8))[:, None])


def test_uint8_pixels_equal_the_float_pipeline(pacsman_series):
    from openmedgemma.imaging import to_pixel_values
    from openmedgemma.imaging.pixel_values import normalize_pixels, to_resized_uint8

    images = volume_input(pacsman_series, max_slices=3).images
    np.testing.assert_array_equal(normalize_pixels(to_resized_uint8(images, 64)).numpy(),
                                  to_pixel_values(images, 64).numpy())  # fmt: skip
