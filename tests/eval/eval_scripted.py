"""Scripted stand-ins for the real models (the engine is not available to these tests).

They only see what a real model sees: the chat messages (text and images). Oracles answer by
looking the question up in tables the tests build from the raw data files themselves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def conversation_text(conversation: list[dict]) -> str:
    parts = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [item["text"] for item in content if item["type"] == "text"]
    return "\n".join(parts)


def conversation_images(conversation: list[dict]) -> list:
    return [
        item["image"]
        for m in conversation
        if not isinstance(m["content"], str)
        for item in m["content"]
        if item["type"] == "image"
    ]


def pixel_key(image) -> str:
    """Hash of the gray pixels of an image given as an array (R channel) or a file."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        image = np.asarray(Image.open(image).convert("L"))
    array = np.asarray(image)
    gray = array[..., 0] if array.ndim == 3 else array
    return hashlib.sha1(np.ascontiguousarray(gray, dtype=np.uint8).tobytes()).hexdigest()


class ScriptedModel:
    """A ChatModel whose answer to each conversation is `answer(conversation)`."""

    def __init__(self, answer, name="scripted"):
        self.answer, self.name = answer, name
        self.calls = 0
        self.seen = 0

    def generate(self, batch, *, max_new_tokens, seed):
        assert isinstance(max_new_tokens, int) and max_new_tokens > 0
        self.calls += 1
        self.seen += len(batch)
        return [self.answer(conversation) for conversation in batch]


class RandomModel(ScriptedModel):
    """Answers `template.format(choice)` with a choice drawn from a seeded generator."""

    def __init__(self, choices, template, seed=0, name="random"):
        rng = np.random.default_rng(seed)
        super().__init__(lambda conv: template.format(choices[rng.integers(len(choices))]), name)


class FailingAfter:
    """Wraps a model and raises on the (k+1)-th call, like a crash in the middle of a run."""

    def __init__(self, model, k):
        self.model, self.k, self.name = model, k, model.name
        self.calls = 0

    def generate(self, batch, *, max_new_tokens, seed):
        if self.calls >= self.k:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.model.generate(batch, max_new_tokens=max_new_tokens, seed=seed)
