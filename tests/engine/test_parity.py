"""Greedy generation equals transformers' `generate(do_sample=False)`, token for token, for 64 new tokens.

Weights travel through files (transformers save_pretrained -> our from_pretrained). Stopping is off on
both sides (no eos), so all 64 tokens are compared; the references are checked to be varied (a model
that repeats one token would prove little) and the logits of every step are compared too.
"""

from __future__ import annotations

import pytest
import torch

from openmedgemma.engine import GenerationConfig, TokenStream, generate_ids
from tests import tiny

NEW = 64
LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)


def text_prompt(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([[2] + torch.randint(3, tiny.BOI, (length - 1,), generator=g).tolist()])


PROMPTS = {  # name: (model kind, ids, number of images)
    "text": ("text", text_prompt(9), 0),
    "text_longer_than_window": ("text", text_prompt(5 * tiny.WINDOW + 3), 0),
    "image": ("mm", tiny.image_prompt(1), 1),
    "two_images": ("mm", tiny.image_prompt(2), 2),
    "text_on_multimodal_model": ("mm", text_prompt(12, seed=4), 0),
    # prompts shorter than the sliding window: decoding starts with a partly filled ring (a new token must see
    # itself before the ring is full), and the window is crossed during decoding
    **{f"text_{n}_tokens": ("text", text_prompt(n, seed=n), 0) for n in (1, 3, 5)},
    **{f"text_{n}_tokens_on_multimodal_model": ("mm", text_prompt(n, seed=10 + n), 0) for n in (1, 3, 5)},
    # an image prompt (24 tokens) shorter than the wide model's window (32), crossed after 8 new tokens
    "image_shorter_than_window": ("mm_wide", tiny.image_prompt(1, text=[]), 1),
}


_REFS: dict[str, tuple[list[int], torch.Tensor]] = {}


def reference(name: str, hf) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and per-step logits [NEW, vocab] (computed once per prompt)."""
    if name not in _REFS:
        _, ids, n_images = PROMPTS[name]
        kwargs = {}
        if n_images:
            kwargs = dict(pixel_values=tiny.pixels(n_images), token_type_ids=(ids == tiny.IMAGE).long())
        with torch.no_grad():
            out = hf.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        assert len(tokens) == NEW and len(set(tokens)) >= 8, f"degenerate reference for {name}: {tokens}"
        _REFS[name] = (tokens, torch.stack(out.scores)[:, 0])
    return _REFS[name]


def ours(model, name: str, prefill_chunk: int, fast: bool) -> tuple[list[int], torch.Tensor]:
    _, ids, n_images = PROMPTS[name]
    images = [tiny.pixels(n_images) if n_images else None]
    config = GenerationConfig(max_new_tokens=NEW)
    tokens = generate_ids(model, [ids[0].tolist()], images, config, prefill_chunk=prefill_chunk, fast=fast)[0]

    logits = []

    def head(hidden):
        logits.append(model.logits(hidden))
        return logits[-1]

    with torch.no_grad():
        feats = [model.image_features(images[0]) if n_images else None]
    steps = [t[0] for t in TokenStream(model, [ids[0].tolist()], feats, config, prefill_chunk=prefill_chunk,
                                       head=head, fast=fast)]  # fmt: skip
    assert steps == tokens
    return tokens, torch.cat(logits)


CASES = [
    # name, prefill_chunk, fast
    ("text", 2048, True),
    ("text", 2048, False),
    ("text_longer_than_window", 2048, True),  # one prefill chunk longer than the ring, then the ring wraps
    ("text_longer_than_window", 5, True),  # chunks smaller than the window and than the prompt
    ("text_longer_than_window", 5, False),
    ("image", 2048, True),
    ("image", 2048, False),
    ("two_images", 2048, True),
    ("two_images", 6, True),  # a chunk smaller than an image: chunks grow to keep each image whole
    ("two_images", 20, False),
    ("text_on_multimodal_model", 2048, True),
    *[(f"text_{n}_tokens", 2048, fast) for n in (1, 3, 5) for fast in (True, False)],
    *[(f"text_{n}_tokens_on_multimodal_model", 2048, False) for n in (1, 3, 5)],
    ("text_3_tokens_on_multimodal_model", 2048, True),
    ("text_5_tokens", 2, False),  # chunks of 2 fill the ring part way before decoding
    ("image_shorter_than_window", 2048, True),
    ("image_shorter_than_window", 2048, False),
]


@pytest.mark.parametrize(("name", "chunk", "fast"), CASES, ids=[f"{n}-chunk{c}-{'fast' if f else 'modules'}"
                                                                for n, c, f in CASES])  # fmt: skip
def test_greedy_matches_transformers(name, chunk, fast, request):
    kind = PROMPTS[name][0]
    hf, model = request.getfixturevalue(f"hf_{kind}")[0], request.getfixturevalue(f"ours_{kind}")
    ref_tokens, ref_logits = reference(name, hf)
    tokens, logits = ours(model, name, chunk, fast)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, **LOGITS_TOL)


def test_batched_equals_one_at_a_time(ours_mm):
    """Prompts of different lengths, with and without images, left-padded together (also chunked)."""
    names = ["two_images", "text_on_multimodal_model", "image"]
    prompts = [PROMPTS[n][1][0].tolist() for n in names]
    images = [tiny.pixels(PROMPTS[n][2]) if PROMPTS[n][2] else None for n in names]
    config = GenerationConfig(max_new_tokens=NEW)
    alone = [generate_ids(ours_mm, [p], [px], config)[0] for p, px in zip(prompts, images)]
    assert len({len(p) for p in prompts}) == 3 and len({tuple(a) for a in alone}) == 3
    assert generate_ids(ours_mm, prompts, images, config) == alone
    assert generate_ids(ours_mm, prompts, images, config, prefill_chunk=7) == alone


def test_batched_text_rows_with_padding_longer_than_window(ours_text):
    prompts = [text_prompt(5 * tiny.WINDOW + 3)[0].tolist(), text_prompt(3, seed=9)[0].tolist()]
    config = GenerationConfig(max_new_tokens=40)
    alone = [generate_ids(ours_text, [p], None, config)[0] for p in prompts]
    assert generate_ids(ours_text, prompts, None, config, prefill_chunk=4) == alone


def test_stop_ids_end_rows_and_are_kept(ours_text):
    ids = PROMPTS["text"][1][0].tolist()
    full = generate_ids(ours_text, [ids], None, GenerationConfig(max_new_tokens=NEW))[0]
    stop = full[10]
    first = full.index(stop)
    out = generate_ids(ours_text, [ids, ids], None, GenerationConfig(max_new_tokens=NEW), stop_ids=[stop])
    assert out == [full[: first + 1]] * 2
