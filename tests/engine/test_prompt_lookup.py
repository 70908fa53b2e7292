"""Prompt-lookup decoding: the KV cache's exact rollback, the draft index, and greedy output token-identical
with it on and off (stop tokens and max_new_tokens inside an accepted run, Engine, the nano model)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from openmedgemma.config import FULL, from_hf_config
from openmedgemma.engine import Engine, GenerationConfig, KVCache, TokenStream, generate_ids
from openmedgemma.engine.lookup import PromptLookup
from openmedgemma.engine.quant import quantize, quantized_head
from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.model.medgemma import MedGemma
from tests import tiny

LOOKUP = 4  # drafts per step in the generation tests (the tiny models' window is 8)


# ---------------------------------------------------------------------- the cache, exactly


def _feed(cache: KVCache, start: int, values: list[float], reversible: bool) -> None:
    """One step of len(values) tokens at positions start..: each key and value is the given number. Checks
    that every query attends to exactly the keys of its window, (q - window, q] on sliding layers, [0, q] on
    global ones: the cached ones real (their position), the step's own as given (a rejected draft's is x.5)."""
    t = len(values)
    q_pos = torch.arange(start, start + t)[None]
    masks = cache.begin(q_pos, reversible=reversible)
    k = torch.tensor(values).view(1, 1, t, 1).expand(1, cache.keys[0].shape[1], t, cache.keys[0].shape[3])
    for idx, kind in enumerate(cache.layer_types):
        keys, _ = cache.update(idx, k.clone(), k.clone())
        mask = masks[kind]
        for i, q in enumerate(range(start, start + t)):
            seen = keys[0, 0, :, 0] if mask is None else keys[0, 0, mask[0, 0, i], 0]
            low = 0 if kind == FULL else max(0, q - cache.window + 1)
            want = [float(p) if p < start else values[p - start] for p in range(low, q + 1)]
            assert sorted(seen.tolist()) == sorted(want), (kind, q, reversible)


def _check_state(cache: KVCache) -> None:
    """The slots hold what plain decoding of `length` real tokens leaves: slot t (global) and ring slot
    t % ring hold the latest time step t there is."""
    n = cache.length
    for idx, kind in enumerate(cache.layer_types):
        keys = cache.keys[idx][0, 0, :, 0]
        if kind == FULL:
            assert keys[:n].tolist() == [float(p) for p in range(n)]
        else:
            for slot in range(min(n, cache.ring)):
                latest = max(p for p in range(n) if p % cache.ring == slot)
                assert keys[slot].item() == float(latest), (slot, n)


@pytest.mark.parametrize("seed", range(4))
def test_rollback_leaves_the_cache_plain_decoding_leaves_after_any_accept_pattern(seed):
    """Decode steps, verify steps of 2..ring tokens with every kept length, prefill-like steps, over a ring
    of 5 slots wrapped many times: every query always sees exactly its window, and the slots hold plain
    decoding's keys (so the overwritten ring slots of rejected drafts came back)."""
    cfg = from_hf_config(tiny.gemma_text_hf_config(sliding_window=5, num_key_value_heads=1, head_dim=4)).text
    rng = random.Random(seed)
    cache = KVCache(cfg, 1, 400, torch.float32, "cpu")
    _feed(cache, 0, [0.0, 1.0, 2.0], reversible=False)  # prefill
    length = 3
    while length < 300:
        if rng.random() < 0.3:
            _feed(cache, length, [float(length)], reversible=False)  # a plain decode step
            length += 1
        else:
            t = rng.randint(2, cache.ring)
            keep = rng.randint(1, t)  # the fed token and keep - 1 drafts are kept
            values = [float(length + i) if i < keep else length + i + 0.5 for i in range(t)]
            _feed(cache, length, values, reversible=True)
            cache.rollback(length + keep)
            length += keep
        assert cache.length == length
        _check_state(cache)


def test_rollback_is_refused_outside_the_last_reversible_step():
    cfg = from_hf_config(tiny.gemma_text_hf_config()).text
    cache = KVCache(cfg, 1, 64, torch.float32, "cpu")
    cache.begin(torch.arange(4)[None])
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(2)
    cache.begin(torch.arange(4, 7)[None], reversible=True)
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(3)  # before the step
    with pytest.raises(ValueError, match="ring slots"):
        cache.begin(torch.arange(7, 7 + cache.ring + 1)[None], reversible=True)


# ---------------------------------------------------------------------- drafts


def test_drafts_follow_the_latest_occurrence_of_the_longest_matching_suffix():
    look = PromptLookup(3, [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7])
    assert look.draft(2) == [9, 2]  # "6 7" last occurred before "9 2" (not the older "8 1")
    look = PromptLookup(3, [5, 6, 7, 8, 4, 4, 6, 7, 1, 5, 6, 7])
    assert look.draft(3) == [8, 4, 4]  # the 3-gram "5 6 7" wins over the later 2-gram "6 7"
    assert PromptLookup(2, [1, 2, 3]).draft(4) == []  # no earlier occurrence of anything
    loop = PromptLookup(2, [3, 4, 3, 4])
    assert loop.draft(5) == [3, 4, 3, 4, 3]  # past the text's end the draft repeats the period


def test_image_soft_tokens_are_never_drafted():
    look = PromptLookup(2, [5, 6, None, None, 8, 5, 6])
    assert look.draft(4) == []  # "5 6" is followed by an image
    look.append(None)
    look.append(7)
    assert look.draft(3) == [] and None not in PromptLookup(1, [7, None, 7]).draft(3)


# ---------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def model():
    """A random text model with the tiny 8-slot sliding window (it wraps many times in 40 tokens)."""
    model = MedGemma(from_hf_config(tiny.gemma_text_hf_config()))
    tiny.randomize(model, seed=4, embed_std=tiny.GENERATION_EMBED_STD)
    return model.eval()


def copying_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(n):
        base = torch.randint(3, tiny.BOI, (10,), generator=g).tolist()
        prompts.append([2] + base * 3 + base[:3])
    return prompts


def run(model, prompt, lookup: int, *, fast=True, **kwargs) -> tuple[list[int], TokenStream]:
    config = GenerationConfig(prompt_lookup_tokens=lookup, **{"max_new_tokens": 40, **kwargs})
    stream = TokenStream(model, [prompt], [None], config, fast=fast)
    return [tokens[0] for tokens in stream], stream


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_tokens_are_identical_with_and_without_prompt_lookup(model, fast):
    accepted = 0
    g = torch.Generator().manual_seed(1)
    plain_prompts = [[2] + torch.randint(3, tiny.BOI, (17,), generator=g).tolist() for _ in range(2)]
    for prompt in copying_prompts(3) + plain_prompts:
        off, plain = run(model, prompt, 0, fast=fast)
        on, stream = run(model, prompt, LOOKUP, fast=fast)
        assert on == off and len(on) == 40
        assert plain.verify_steps == 0 and stream.verify_steps > 0
        assert stream.accepted <= stream.drafted
        accepted += stream.accepted
    assert accepted > 10


def inside_runs(model, prompt) -> tuple[list[int], list[int]]:
    """The tokens of a prompt-lookup run and the indices of tokens followed by another token of the same
    verify step (a stop or the token limit there cuts an accepted run)."""
    forwards = []

    def head(hidden):  # called once per forward, whatever its number of tokens
        forwards.append(hidden.shape[0])
        return model.logits(hidden)

    config = GenerationConfig(max_new_tokens=40, prompt_lookup_tokens=LOOKUP)
    stream = TokenStream(model, [prompt], [None], config, head=head)
    tokens, made_by = [], []
    for row in stream:
        tokens.append(row[0])
        made_by.append(len(forwards))
    # tokens i and i + 1 came out of one forward when none ran in between
    inside = [i for i in range(len(tokens) - 1) if made_by[i] == made_by[i + 1]]
    return tokens, inside


def test_a_stop_inside_an_accepted_run_ends_it_there(model):
    """The caller marks the row done (as Engine does on a stop token or string) at a token of an accepted
    run: the stream yields nothing more. And stop ids give the same tokens on and off."""
    for prompt in copying_prompts(2):
        tokens, inside = inside_runs(model, prompt)
        assert inside
        for i in inside[:4]:
            forwards = []

            def head(hidden):
                forwards.append(hidden.shape[0])
                return model.logits(hidden)

            config = GenerationConfig(max_new_tokens=40, prompt_lookup_tokens=LOOKUP)
            stream = TokenStream(model, [prompt], [None], config, head=head)
            seen = []
            for row in stream:
                seen.append(row[0])
                if len(seen) == i + 1:
                    stream.done[0] = True
                    at_stop = len(forwards)
            assert seen == tokens[: i + 1] and len(forwards) == at_stop  # and no forward ran after it
        firsts = [i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]]
        for i in firsts[-2:]:
            for lookup in (0, LOOKUP):
                config = GenerationConfig(max_new_tokens=40, prompt_lookup_tokens=lookup)
                assert generate_ids(model, [prompt], config=config, stop_ids=[tokens[i]]) == [tokens[: i + 1]]


def test_max_new_tokens_inside_an_accepted_run(model):
    for prompt in copying_prompts(2):
        tokens, inside = inside_runs(model, prompt)
        assert inside
        for i in inside[:6]:
            on, stream = run(model, prompt, LOOKUP, max_new_tokens=i + 1)
            assert on == tokens[: i + 1]
            assert stream.cache.length <= len(prompt) + i + 1  # the cache never took more


def test_sampling_and_batches_decode_plainly(model):
    prompts = copying_prompts(2)
    for config in (GenerationConfig(max_new_tokens=20, temperature=0.8, seed=3, prompt_lookup_tokens=LOOKUP),
                   GenerationConfig(max_new_tokens=20, prompt_lookup_tokens=LOOKUP)):  # fmt: skip
        batch = prompts if config.greedy else prompts[:1]
        stream = TokenStream(model, batch, [None] * len(batch), config)
        out = list(stream)
        assert stream.verify_steps == 0
        plain = list(TokenStream(model, batch, [None] * len(batch), GenerationConfig(
            max_new_tokens=20, temperature=config.temperature, seed=config.seed)))  # fmt: skip
        assert out == plain


def test_int8_weight_only_is_identical_and_int8_dynamic_decodes_plainly(model):
    """int8-dynamic quantizes a step's activations per tensor: a verify step would not compute decoding's
    function (measured: 6 of 6 prompts differed), so it falls back; weight-only int8 is row-wise."""
    prompts = copying_prompts(2)
    for mode in ("int8", "int8-dynamic"):
        quantized = copy.deepcopy(model)
        quantize(quantized, mode)
        head = quantized_head(quantized, mode)
        for prompt in prompts:
            outs, streams = [], []
            for lookup in (0, LOOKUP):
                config = GenerationConfig(max_new_tokens=30, prompt_lookup_tokens=lookup)
                streams.append(TokenStream(quantized, [prompt], [None], config, head=head))
                outs.append([t[0] for t in streams[-1]])
            assert outs[0] == outs[1]
            assert (streams[1].verify_steps > 0) == (mode == "int8")


def test_image_prompts_draft_text_only():
    ours_mm = MedGemma(from_hf_config(tiny.gemma_mm_hf_config()))
    tiny.randomize(ours_mm, embed_std=tiny.GENERATION_EMBED_STD)
    ours_mm.eval()
    text = torch.randint(3, tiny.BOI, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    ids = tiny.image_prompt(2, text=text * 3)[0].tolist()
    feats = ours_mm.image_features(tiny.pixels(2)).detach()
    outs = []
    for lookup in (0, LOOKUP):
        stream = TokenStream(ours_mm, [ids], [feats], GenerationConfig(max_new_tokens=30, prompt_lookup_tokens=lookup))
        outs.append([t[0] for t in stream])
    assert outs[0] == outs[1] and stream.verify_steps > 0


def test_config_is_validated():
    for field, value in (("prompt_lookup_tokens", -1), ("prompt_lookup_ngram", 0), ("prompt_lookup_tokens", 2.0),
                         ("prompt_lookup_tokens", True)):  # fmt: skip
        with pytest.raises(OpenMedGemmaError, match=field):
            GenerationConfig(**{field: value})


# ---------------------------------------------------------------------- Engine and the nano model


REPORT = ("The chest X-ray shows a small left pleural effusion and no pneumothorax. No acute cardiopulmonary "
          "process. The heart size is normal.")  # fmt: skip


def test_engine_generate_and_stream_are_identical_on_and_off(engine, monkeypatch):
    verified = []
    plain_verify = TokenStream._verify

    def verify(self, *args):
        verified.append(self.config.prompt_lookup_tokens)
        return plain_verify(self, *args)

    monkeypatch.setattr(TokenStream, "_verify", verify)
    messages = [{"role": "user", "content": f"Rewrite this radiology report with headings: {REPORT} {REPORT}"}]
    [plain] = engine.generate([messages], GenerationConfig(max_new_tokens=48))
    middle = plain.text[len(plain.text) // 2 :][:3]  # a stop string the answer reaches before its stop token
    for stops, reason in (((), plain.stop_reason), ((middle,), "stop_string")):
        results, streamed = [], []
        for lookup in (0, 6):
            config = GenerationConfig(max_new_tokens=48, prompt_lookup_tokens=lookup, stop_strings=stops)
            [result] = engine.generate([messages], config)
            results.append((result.text, result.token_ids, result.stop_reason))
            streamed.append(("".join(engine.stream(messages, config)), engine.last_result.token_ids))
            assert streamed[-1] == results[-1][:2]
        assert results[0] == results[1] and streamed[0] == streamed[1] and results[0][2] == reason
    assert verified and set(verified) == {6}  # the Engine's runs did verify drafts, only when asked to


@pytest.fixture(scope="module")
def nano():
    from openmedgemma.bundled import nano_path

    return Engine.from_pretrained(nano_path("medgemma"))


def test_nano_on_a_vqa_rad_question_is_identical_on_and_off(nano, shared_data):
    folder = shared_data / "vqa_rad"
    item = json.loads((folder / "VQA_RAD Dataset Public.json").read_text())[8]  # "Where is the abnormality?"
    image = folder / "VQA_RAD Image Folder" / item["image_name"]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": item["question"]}]}]  # fmt: skip
    prompt = nano.prepare(messages)
    features = nano._features_for([prompt])
    outs, streams = [], []
    for lookup in (0, 8):
        # no stop: 64 tokens, so the answer runs on long enough to copy itself and accept drafts
        config = GenerationConfig(max_new_tokens=64, prompt_lookup_tokens=lookup)
        streams.append(TokenStream(nano.model, [prompt.ids], features, config, fast=nano.decoder))
        outs.append([t[0] for t in streams[-1]])
    assert outs[0] == outs[1] and streams[1].accepted > 0
    results = [nano.generate([messages], GenerationConfig(max_new_tokens=64, prompt_lookup_tokens=k))[0]
               for k in (0, 8)]  # fmt: skip
    assert results[0].token_ids == results[1].token_ids
