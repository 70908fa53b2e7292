"""Verifiable rewards and the reward interface."""

from __future__ import annotations

import pytest

from openmedgemma.errors import ConfigError
from openmedgemma.train.data import Example, mcq_example
from openmedgemma.train.rewards import (
    CombinedReward,
    exact_match,
    get_reward,
    mcq_letter,
    parse_letter,
    register_reward,
    rouge_l,
    token_f1,
)


def test_exact_match_normalises_case_punctuation_and_articles():
    ex = Example(answer="The left lung.")
    assert exact_match("left LUNG", ex) == 1.0
    assert exact_match("a left lung!", ex) == 1.0
    assert exact_match("right lung", ex) == 0.0


def test_token_f1():
    ex = Example(answer="left lower lobe")
    assert token_f1("left lower lobe", ex) == 1.0
    assert token_f1("lower lobe", ex) == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("pneumothorax", ex) == 0.0
    assert token_f1("", Example(answer="")) == 1.0


@pytest.mark.parametrize("text,letter", [
    ("The lungs are clear. Final Answer: (C)", "C"), ("Final Answer: B", "B"), ("final answer:(d)", "D"),
    ("I think (A) is wrong and (B) is right", "B"), ("A. because ...", "A"), ("no letter here", None),
    ("Final Answer: (Z)", None),
])  # fmt: skip
def test_parse_letter(text, letter):
    assert parse_letter(text, "ABCDE") == letter


def test_mcq_letter_uses_the_example_answer_letter():
    ex = mcq_example("Which?", {"A": "x", "B": "y", "C": "z"}, "B", "test")
    assert mcq_letter("Final Answer: (B)", ex) == 1.0
    assert mcq_letter("Final Answer: (A)", ex) == 0.0
    assert mcq_letter("(D)", ex) == 0.0  # not an option of this question


def test_rouge_l():
    ex = Example(answer="small left pleural effusion")
    assert rouge_l("small left pleural effusion", ex) == 1.0
    assert rouge_l("left effusion small", ex) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_user_rewards_by_registration_and_by_import_path():
    register_reward("answer_length", lambda completion, example: float(len(completion) < 10))
    combined = CombinedReward({"answer_length": 0.5, "exact_match": 1.0})
    assert combined("yes", Example(answer="yes")) == 1.5
    assert get_reward("openmedgemma.train.rewards:token_f1") is token_f1
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ConfigError, match="cannot be imported"):
        get_reward("openmedgemma.train.rewards:missing")
