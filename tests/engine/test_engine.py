"""Engine: chat messages, stop strings, streaming, thinking, the image feature cache, batching, errors.

Text-level tests script the model's output: the head is replaced by one that puts all probability on
the next id of a script, so the generated text is known (a random tiny model emits byte soup).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openmedgemma import MedGemma
from openmedgemma.engine import Engine, GenerationConfig
from openmedgemma.errors import ImageError, OpenMedGemmaError
from openmedgemma.tokenizer import Tokenizer
from tests import tiny


class Script:
    """A head emitting `ids` in order (then repeating the last one)."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab, self.calls = ids, vocab, 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], self.vocab), -1e4)
        logits[:, self.ids[min(self.calls, len(self.ids) - 1)]] = 0.0
        self.calls += 1
        return logits


def scripted(engine: Engine, ids: list[int]) -> Engine:
    fresh = Engine(engine.model, engine.tokenizer)
    fresh.head = Script(ids, engine.model.config.text.vocab_size)
    return fresh


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def ask(text: str, *images) -> list[dict]:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_streamed_deltas_join_to_the_final_text_and_never_split_a_character(engine):
    tok = engine.tokenizer
    text = "肺炎 (pneumonia) 🫁 is not normal; café."
    ids = tok.encode(text) + [tok.end_of_turn_id]
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback is exercised
    run = scripted(engine, ids)
    deltas = list(run.stream(ask("Describe.")))
    assert len(deltas) > 3
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == run.last_result.text
    [result] = scripted(engine, ids).generate([ask("Describe.")])
    assert result.text == text and result.stop_reason == "stop_token" and result.token_ids == ids


def test_stop_strings_cut_the_text_and_are_never_streamed(engine):
    tok = engine.tokenizer
    ids = tok.encode("Final Answer: yes. STOP and then more text") + [tok.end_of_turn_id]
    config = GenerationConfig(max_new_tokens=100, stop_strings=("STOP", "never"))
    run = scripted(engine, ids)
    deltas = list(run.stream(ask("Q?"), config))
    result = run.last_result
    assert result.text == "Final Answer: yes." == "".join(deltas)
    assert result.stop_reason == "stop_string" and result.new_tokens < len(ids)
    assert all("S" not in d for d in deltas)


def test_max_new_tokens_ends_generation(engine):
    tok = engine.tokenizer
    run = scripted(engine, tok.encode("one two three four five six"))
    [result] = run.generate([ask("Q?")], GenerationConfig(max_new_tokens=3))
    assert result.new_tokens == 3 and result.stop_reason == "max_new_tokens"


def test_thinking_is_split_and_shown_only_on_request(engine):
    tok = engine.tokenizer
    ids = ([tok.thought_start_id] + tok.encode("thought\nThe lungs are clear.") + [tok.thought_end_id]
           + tok.encode("Final Answer: (B)") + [tok.end_of_turn_id])  # fmt: skip
    [result] = scripted(engine, ids).generate([ask("Q?")])
    assert result.thought == "The lungs are clear." and result.text == "Final Answer: (B)"
    assert "".join(scripted(engine, ids).stream(ask("Q?"))) == "Final Answer: (B)"
    shown = "".join(scripted(engine, ids).stream(ask("Q?"), GenerationConfig(show_thinking=True)))
    assert "The lungs are clear." in shown and shown.endswith("Final Answer: (B)")


def test_image_features_are_computed_once_per_distinct_image(chat_dir, monkeypatch):
    model = MedGemma.from_pretrained(chat_dir)
    calls = []
    original = model.image_features

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return original(pixel_values)

    monkeypatch.setattr(model, "image_features", counting)
    engine = Engine(model, Tokenizer.from_pretrained(chat_dir))
    config = GenerationConfig(max_new_tokens=6)
    first = engine.generate([ask("What is this?", image(0))], config)[0]
    assert calls == [1] and engine.vision_calls == 1
    again = engine.generate([ask("What is this?", Image.fromarray(image(0)))], config)[0]  # same pixels, other object
    assert calls == [1] and again.token_ids == first.token_ids
    engine.generate([ask("Compare.", image(0), image(1)), ask("And this?", image(1)), ask("Hi")], config)
    assert calls == [1, 1] and engine.vision_calls == 2  # only image 1 was new, run once for two prompts
    uncached = Engine(model, engine.tokenizer, image_cache_size=0)
    assert uncached.generate([ask("What is this?", image(0))], config)[0].token_ids == first.token_ids


def test_a_batch_with_more_distinct_images_than_the_cache_holds(chat_dir):
    """Storing a batch's new features evicts old ones; the batch must still get every image's features."""
    model, tok = MedGemma.from_pretrained(chat_dir), Tokenizer.from_pretrained(chat_dir)
    config = GenerationConfig(max_new_tokens=4)
    convs = [ask("What is this?", image(i)) for i in (8, 9, 10, 7)]
    small = Engine(model, tok, image_cache_size=2)
    small.generate([convs[3]], config)  # image 7 cached, then evicted while 8, 9, 10 are stored
    results = small.generate(convs, config)
    reference = Engine(model, tok, image_cache_size=64).generate(convs, config)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert len(small._features) == 2


def test_engine_batches_equal_single_conversations(engine):
    convs = [ask("What is this?", image(3)), [{"role": "user", "content": "Hello there"}],
             [{"role": "system", "content": "Be brief."}, *ask("Compare.", image(4), image(5))]]  # fmt: skip
    config = GenerationConfig(max_new_tokens=12)
    alone = [engine.generate([c], config)[0] for c in convs]
    for size in (3, 2):
        engine.max_batch_size = size
        together = engine.generate(convs, config)
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]
    engine.max_batch_size = 8
    assert alone[2].prompt_tokens > alone[0].prompt_tokens > alone[1].prompt_tokens


def test_medgemma_chat_and_stream_use_the_folder_tokenizer(chat_dir, engine):
    model = MedGemma.from_pretrained(chat_dir)
    expected = engine.chat("Hello", max_new_tokens=10)
    assert model.chat("Hello", max_new_tokens=10) == expected
    assert "".join(model.stream([{"role": "user", "content": "Hello"}], max_new_tokens=10)) == expected
    result = model.chat("Hello", max_new_tokens=10, return_result=True)
    assert result.text == expected and result.prompt_tokens > 0 and result.time_to_first_token > 0


def test_errors_are_clear(chat_dir, engine, tmp_path, ours_text, ours_mm):
    with pytest.raises(OpenMedGemmaError, match="list of conversations"):
        engine.generate(ask("Q?"))
    with pytest.raises(ImageError, match="no network access"):
        engine.generate([ask("Q?", "https://example.com/x.png")])
    with pytest.raises(ImageError, match="file not found"):
        engine.generate([ask("Q?", str(tmp_path / "missing.png"))])
    with pytest.raises(OpenMedGemmaError, match="unknown generation option"):
        engine.chat("Q?", max_tokens=3)
    with pytest.raises(OpenMedGemmaError, match="not loaded from a folder"):
        MedGemma.chat(_unloaded(ours_text), "Hello")
    with pytest.raises(OpenMedGemmaError, match="image soft token is id 9 but the model expects 96"):
        Engine(ours_mm, engine.tokenizer)


def test_text_only_model_refuses_images(ours_text, tmp_path):
    tok_dir = tiny.chat_checkpoint(tmp_path / "text", multimodal=False)
    engine = Engine(MedGemma.from_pretrained(tok_dir), Tokenizer.from_pretrained(tok_dir))
    assert engine.chat("Hello", max_new_tokens=3, return_result=True).new_tokens > 0
    with pytest.raises(OpenMedGemmaError, match="text-only"):
        engine.generate([ask("Q?", image(0))])


def _unloaded(model):
    from openmedgemma.config import from_hf_config

    return MedGemma(from_hf_config(tiny.gemma_text_hf_config()))

