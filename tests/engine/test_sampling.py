"""Sampling: support restricted by top-k / top-p on controlled logits, determinism under a seed."""

from __future__ import annotations

import math

import pytest
import torch

from openmedgemma.engine import GenerationConfig, generate_ids
from openmedgemma.engine.sampling import filter_logits, next_tokens
from openmedgemma.errors import OpenMedGemmaError

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 at ids 3, 0, 4, 1, 2
PROBS = torch.tensor([0.25, 0.07, 0.03, 0.5, 0.15])
LOGITS = PROBS.log()[None]


def _support(config: GenerationConfig, draws: int = 3000) -> set[int]:
    g = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(draws, -1)
    return set(next_tokens(logits, config, g).tolist())


@pytest.mark.parametrize(
    ("top_k", "top_p", "allowed"),
    [
        (None, None, {0, 1, 2, 3, 4}),
        (1, None, {3}),
        (2, None, {3, 0}),
        (None, 0.5, {3}),  # 0.5 alone reaches 0.5
        (None, 0.6, {3, 0}),
        (None, 0.8, {3, 0, 4}),  # 0.5 + 0.25 = 0.75 < 0.8: the 0.15 token is needed too
        (None, 0.95, {3, 0, 4, 1}),
        (4, 0.6, {3, 0}),
        (2, 0.99, {3, 0}),
    ],
)
def test_top_k_top_p_restrict_the_support(top_k, top_p, allowed):
    config = GenerationConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    kept = torch.isfinite(filter_logits(LOGITS, config))[0].nonzero().flatten().tolist()
    assert set(kept) == allowed
    assert _support(config) == allowed  # every allowed token is drawn, none other


@pytest.mark.parametrize(("top_p", "kept"), [(0.25, 1), (0.5, 2), (0.75, 3), (0.375, 2), (0.5000001, 3)])
def test_top_p_boundary_with_probabilities_exact_in_binary(top_p, kept):
    """Equal logits give probabilities 1/4 exactly (softmax of zeros), so the running sums 0.25, 0.5, 0.75 are exact:
    a top_p equal to a running sum keeps exactly the tokens that reach it, never the next one (no float rounding)."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("-inf")]])
    assert logits.softmax(-1)[0, :4].tolist() == [0.25] * 4
    config = GenerationConfig(temperature=1.0, top_p=top_p)
    assert int(torch.isfinite(filter_logits(logits, config)).sum()) == kept


def test_sampled_frequencies_follow_the_renormalized_distribution():
    config = GenerationConfig(temperature=1.0, top_k=3)
    draws = next_tokens(LOGITS.expand(20000, -1), config, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.tensor([0.25, 0, 0, 0.5, 0.15]) / 0.9
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_temperature_sharpens_and_flattens():
    cold = filter_logits(LOGITS, GenerationConfig(temperature=0.25)).softmax(-1)[0]
    hot = filter_logits(LOGITS, GenerationConfig(temperature=4.0)).softmax(-1)[0]
    assert cold[3] > PROBS[3] > hot[3]
    assert math.isclose(float(cold.sum()), 1.0, rel_tol=1e-6)


def test_greedy_ignores_top_k_and_seed():
    assert next_tokens(LOGITS, GenerationConfig(temperature=0.0, top_k=2, seed=3), None).tolist() == [3]


def test_same_seed_same_tokens(ours_text):
    prompts = [[2, 10, 11, 12], [2, 40, 41]]
    config = GenerationConfig(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    a = generate_ids(ours_text, prompts, None, config)
    b = generate_ids(ours_text, prompts, None, config)
    other = generate_ids(ours_text, prompts, None, GenerationConfig(max_new_tokens=24, temperature=1.0, seed=8))
    greedy = generate_ids(ours_text, prompts, None, GenerationConfig(max_new_tokens=24))
    assert a == b
    assert a != other and a != greedy


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
     dict(stop_strings=("",))],
)  # fmt: skip
def test_bad_generation_config_is_refused(kwargs):
    with pytest.raises(OpenMedGemmaError):
        GenerationConfig(**kwargs)


def test_a_single_stop_string_may_be_given_as_a_string():
    assert GenerationConfig(stop_strings="END").stop_strings == ("END",)
