"""Verifiable rewards for RL: a reward is `fn(completion: str, example: Example) -> float`.

Built in: `exact_match`, `token_f1`, `mcq_letter`, `rouge_l` (token-level ROUGE-L F1, the 1.5 report's reward
for pathology reports). Add your own with `register_reward("name", fn)`, or name one in the config as
`"package.module:function"` (imported when the run starts).

Text normalisation (ours; the report does not publish one): lower case, punctuation removed, articles
(a, an, the) dropped, whitespace collapsed. Tokens are the words of the normalised text.
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable

from openmedgemma.errors import ConfigError

Reward = Callable[[str, object], float]
_REWARDS: dict[str, Reward] = {}
# "Final Answer: (B)", "Final Answer: B", "(B)", "B." / "B)" at the start.
_FINAL = re.compile(r"final answer\s*[:\-]?\s*\(?\s*([A-Z])\s*\)?", re.IGNORECASE)
_PAREN = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^\s*([A-Z])(?:[.):\s]|$)")


def normalize(text: str) -> str:
    """The evaluation's SQuAD normalization, so that RL optimizes the metric the report is scored on."""
    from openmedgemma.eval.metrics import normalize_answer

    return normalize_answer(text)


def reference(example) -> str:
    return str(getattr(example, "answer", example))


def register_reward(name: str, fn: Reward) -> Reward:
    _REWARDS[name] = fn
    return fn


def reward(name: str):
    """Decorator form of `register_reward`."""
    return lambda fn: register_reward(name, fn)


@reward("exact_match")
def exact_match(completion: str, example) -> float:
    return float(normalize(completion) == normalize(reference(example)))


@reward("token_f1")
def token_f1(completion: str, example) -> float:
    from openmedgemma.eval.metrics import token_f1 as squad_token_f1

    return squad_token_f1(completion, reference(example))


def parse_letter(completion: str, letters: str = string.ascii_uppercase) -> str | None:
    """The option letter a completion commits to: the last "Final Answer: X", else the last "(X)", else a
    leading "X." / "X)" / "X"."""
    for pattern in (_FINAL, _PAREN):
        found = [m.group(1).upper() for m in pattern.finditer(completion)]
        found = [f for f in found if f in letters]
        if found:
            return found[-1]
    m = _LEADING.match(completion)
    return m.group(1) if m and m.group(1) in letters else None


@reward("mcq_letter")
def mcq_letter(completion: str, example) -> float:
    meta = getattr(example, "meta", {}) or {}
    truth = meta.get("answer_letter") or parse_letter(reference(example))
    if truth is None:
        raise ValueError(f"{getattr(example, 'source', 'example')}: mcq_letter needs an MCQ example (answer_letter)")
    options = "".join(meta.get("options", {})) or string.ascii_uppercase
    return float(parse_letter(completion, options) == truth)


@reward("rouge_l")
def rouge_l(completion: str, example) -> float:
    """The evaluation's report-generation ROUGE-L (both empty counts as a match)."""
    from openmedgemma.eval.report_metrics import rouge_l as report_rouge_l
    from openmedgemma.eval.report_metrics import tokens as report_tokens

    ref = reference(example)
    if not report_tokens(completion) or not report_tokens(ref):
        return float(report_tokens(completion) == report_tokens(ref))
    return report_rouge_l(completion, ref)


def get_reward(name: str) -> Reward:
    """A registered reward, or `module:function` imported."""
    if name in _REWARDS:
        return _REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward {name!r} cannot be imported: {err}") from None
        if not callable(fn):
            raise ConfigError(f"reward {name!r} is not callable")
        return fn
    raise ConfigError(f"unknown reward {name!r}; built in: {', '.join(sorted(_REWARDS))} (or 'module:function')")


def check_reward_names(rewards: dict[str, float], file: str) -> None:
    for name, weight in rewards.items():
        if name not in _REWARDS and ":" not in name:
            raise ConfigError(
                f"{file}: rl.rewards: unknown reward {name!r}; built in: {', '.join(sorted(_REWARDS))} "
                "(or 'package.module:function')"
            )
        if not isinstance(weight, float):
            raise ConfigError(f"{file}: rl.rewards.{name} must be a number (its weight)")


class CombinedReward:
    """Weighted sum of named rewards."""

    def __init__(self, weights: dict[str, float]):
        self.parts = [(name, get_reward(name), float(w)) for name, w in weights.items()]

    def __call__(self, completion: str, example) -> float:
        return sum(w * float(fn(completion, example)) for _, fn, w in self.parts)
