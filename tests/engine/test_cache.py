"""The KV cache's memory, layout and masks; prefill chunk planning."""

from __future__ import annotations

import pytest
import torch

from openmedgemma.config import FULL, SLIDING, get_config
from openmedgemma.engine import GenerationConfig, KVCache, TokenStream, plan_chunks
from openmedgemma.errors import OpenMedGemmaError
from tests import tiny


def _sizes(cache: KVCache) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {SLIDING: set(), FULL: set()}
    for kind, k, v in zip(cache.layer_types, cache.keys, cache.values):
        assert k.shape == v.shape
        out[kind].add(k.shape[2])
    return out


def test_sliding_layers_do_not_grow_with_context(ours_text):
    cfg = ours_text.config.text
    short = KVCache(cfg, batch=1, capacity=2 * cfg.sliding_window, dtype=torch.float32, device="cpu")
    long = KVCache(cfg, batch=1, capacity=50 * cfg.sliding_window, dtype=torch.float32, device="cpu")
    assert _sizes(short) == {SLIDING: {cfg.sliding_window}, FULL: {2 * cfg.sliding_window}}
    assert _sizes(long) == {SLIDING: {cfg.sliding_window}, FULL: {50 * cfg.sliding_window}}
    n_sliding = cfg.layer_types.count(SLIDING)
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    grown = long.nbytes - short.nbytes
    assert grown == (50 - 2) * cfg.sliding_window * per_slot * (len(cfg.layer_types) - n_sliding)  # globals only
    assert long.nbytes == KVCache.nbytes_for(cfg, 1, 50 * cfg.sliding_window, torch.float32)


def test_cache_after_a_long_generation_keeps_the_window(ours_text):
    cfg = ours_text.config.text
    prompt = torch.randint(3, tiny.BOI, (6 * cfg.sliding_window,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = TokenStream(ours_text, [prompt], [None], GenerationConfig(max_new_tokens=20), prefill_chunk=5)
    assert len(list(stream)) == 20
    assert stream.cache.length == len(prompt) + 19  # the last token is never fed back
    assert _sizes(stream.cache)[SLIDING] == {cfg.sliding_window}
    # after a chunked prefill, the ring slots hold the prompt's last `window` positions
    stream = TokenStream(ours_text, [prompt], [None], GenerationConfig(max_new_tokens=1), prefill_chunk=5)
    list(stream)
    assert sorted(stream.cache.ring_pos[0].tolist()) == list(range(len(prompt) - cfg.sliding_window, len(prompt)))


def test_4b_kv_cache_at_32k_is_under_30_percent_of_all_global():
    text = get_config("4b").text
    ours = KVCache.nbytes_for(text, 1, 32 * 1024, torch.bfloat16)
    all_global = 2 * 32 * 1024 * text.num_key_value_heads * text.head_dim * 2 * text.num_hidden_layers
    assert text.layer_types.count(FULL) == 5 and text.num_hidden_layers == 34
    assert ours / all_global == pytest.approx((5 * 32768 + 29 * 1024) / (34 * 32768))
    assert ours / all_global <= 0.30


def test_chunk_masks_match_full_attention_masks(ours_mm):
    """Prefill in chunks sees, per query, exactly the keys a one-shot forward lets it see."""
    ids = tiny.image_prompt(2)
    feats = ours_mm.image_features(tiny.pixels(2)).detach()
    with torch.no_grad():
        ref = ours_mm(ids, image_features=feats)[0, -1]
    for chunk in (1, 3, 8, 17, 1000):
        logits = []
        def head(hidden):
            logits.append(ours_mm.logits(hidden))
            return logits[-1]

        stream = TokenStream(ours_mm, [ids[0].tolist()], [feats], GenerationConfig(max_new_tokens=1),
                             prefill_chunk=chunk, head=head)  # fmt: skip
        list(stream)
        torch.testing.assert_close(logits[0][0], ref, atol=3e-5, rtol=3e-5)


def test_full_cache_is_refused(ours_text):
    cache = KVCache(ours_text.config.text, 1, 4, torch.float32, "cpu")
    cache.begin(torch.arange(3)[None])
    with pytest.raises(ValueError, match="KV cache full"):
        cache.begin(torch.arange(3, 5)[None])


def _image_rows(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "i" for c in row] for row in rows])


@pytest.mark.parametrize(
    ("rows", "chunk", "expected"),
    [
        (["tttttttt"], 3, [(0, 3), (3, 6), (6, 8)]),
        (["ttiiiitt"], 3, [(0, 2), (2, 6), (6, 8)]),  # the image starts the 2nd chunk: it is taken whole
        (["ttiiiitt"], 4, [(0, 2), (2, 6), (6, 8)]),
        (["iiiiiiii"], 2, [(0, 8)]),
        (["ttttiiii", "iiiitttt"], 3, [(0, 4), (4, 8)]),  # no boundary may split an image of any row
        (["tiitiit"], 2, [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]),
        (["t"], 5, [(0, 1)]),
    ],
)
def test_plan_chunks_never_splits_an_image(rows, chunk, expected):
    is_image = _image_rows(*rows)
    plan = plan_chunks(is_image, chunk)
    assert plan == expected
    assert plan[0][0] == 0 and plan[-1][1] == is_image.shape[1]
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))


def test_plan_chunks_rejects_nonpositive_chunk():
    with pytest.raises(OpenMedGemmaError, match="prefill_chunk"):
        plan_chunks(_image_rows("tt"), 0)
