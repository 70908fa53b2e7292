"""The MedGemma engine as an evaluation `ChatModel` (see protocols.py)."""

from __future__ import annotations

from pathlib import Path


class MedGemmaChatModel:
    """Greedy by default, as the report evaluates; answers come back with any thinking block split off."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    @classmethod
    def from_pretrained(cls, path):
        from openmedgemma.engine import Engine

        return cls(Engine.from_pretrained(path), Path(path).resolve().name)

    @property
    def context_tokens(self) -> int:
        """The model's context length (prompt + answer), for callers that fit long inputs (the EHR navigator)."""
        return self.engine.model.config.text.max_position_embeddings

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with this model's tokenizer (chat-format tokens around it not included)."""
        return len(self.engine.tokenizer.encode(text))

    def generate(self, batch, *, max_new_tokens: int, seed: int) -> list[str]:
        from openmedgemma.engine import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed)  # temperature 0: greedy
        return [result.text for result in self.engine.generate(batch, config)]
