"""The MedGemma engine as an evaluation `ChatModel` (see protocols.py)."""

from __future__ import annotations

from pathlib import Path


class MedGemmaChatModel:
    """Greedy by default, as the report evaluates; answers come back with any thinking block split off."""

    def __init__(self, engine, name: str, temperature: float = 0.0):
        self.engine, self.name, self.temperature = engine, name, temperature

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, batch_size: int = 8, quantize=None):
        from openmedgemma.engine import Engine

        engine = Engine.from_pretrained(path, dtype=dtype, device=device, quantize=quantize, max_batch_size=batch_size)
        return cls(engine, Path(path).resolve().name)

    def generate(self, batch, *, max_new_tokens: int, seed: int) -> list[str]:
        from openmedgemma.engine import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, seed=seed)
        return [result.text for result in self.engine.generate(batch, config)]
