"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (in that order, as transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openmedgemma.errors import OpenMedGemmaError


@dataclass
class GenerationConfig:
    """How to generate. temperature 0 means greedy (top_k / top_p are then ignored).

    seed: sampling draws from a generator seeded with it (same seed, same tokens); None uses torch's
    global RNG. stop_strings: generation of a row ends once its text contains one; the text is cut
    before it. show_thinking: stream the thinking block too (results always carry it as `thought`).

    prompt_lookup_tokens: greedy, one prompt at a time: draft up to this many tokens per step from
    what followed the latest earlier occurrence of the text's last n-gram (prompt and answer so far;
    n from prompt_lookup_ngram down to 1) and check them in one forward; the tokens are those of plain
    greedy decoding (engine/generate.py). Sampling, batches of several prompts, int8-dynamic models
    and the serving scheduler decode plainly. Off (0) by default: answers that copy their input
    (report rewrites, long loops) gain ~2-3x decode speed (benchmarks/RESULTS.md), but where drafts
    are proposed and rejected each step costs a forward of 1 + N tokens instead of 1, measured at
    0.36x decode speed for N = 8 on a 130M model on CPU when every draft fails; natural text that does
    not copy still matches single tokens of the prompt often, so it would pay that price.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    show_thinking: bool = False
    prompt_lookup_tokens: int = 0
    prompt_lookup_ngram: int = 3

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OpenMedGemmaError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise OpenMedGemmaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OpenMedGemmaError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OpenMedGemmaError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise OpenMedGemmaError("stop_strings must not contain an empty string")
        for name, low in (("prompt_lookup_tokens", 0), ("prompt_lookup_ngram", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OpenMedGemmaError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """logits [B, V] -> temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= config.top_p  # keep the smallest set reaching top_p (the top token always)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits of the last position -> [B] token ids."""
    if config.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, config).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
