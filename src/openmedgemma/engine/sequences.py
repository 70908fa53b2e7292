"""Per-request state for continuous batching: what was asked, what has been generated, how to report it.

A `Request` is what a caller submits (prompt, sampling, logprobs, a callback for events); the
scheduler turns it into a `Sequence` that moves WAITING -> PREFILLING -> RUNNING -> FINISHED.
Events reach the caller through `on_event`, called on the scheduler thread: it must only hand the
event over (e.g. `loop.call_soon_threadsafe`), never block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from openmedgemma.engine.engine import MAX_NEW_TOKENS, STOP_STRING, STOP_TOKEN  # noqa: F401 (the engine's reasons)
from openmedgemma.engine.sampling import GenerationConfig

WAITING, PREFILLING, RUNNING, FINISHED = "waiting", "prefilling", "running", "finished"
CANCELLED = "cancelled"


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model (before temperature / top-k / top-p, as
    vLLM reports by default) and the `top` most likely alternatives as (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New output of one step: text that will never be taken back, and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    """The end of a request: the rest of the text and the result (engine.GenerationResult, or None when
    cancelled or failed), with `error` set when it failed."""

    text: str
    result: Any
    reason: str
    logprobs: list[TokenLogprob] | None = None
    error: Exception | None = None


@dataclass
class Request:
    """prompt: `Engine.prepare(messages)`; logprobs: None (off) or how many alternatives per token;
    ignore_eos: generate `max_new_tokens` even past the end-of-turn token (benchmarks, as vLLM's)."""

    prompt: Any
    config: GenerationConfig
    on_event: Callable[[Delta | Finished], None]
    logprobs: int | None = None
    ignore_eos: bool = False
    request_id: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (client gone); it frees the slot at its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Sequence:
    """The scheduler's state for one request."""

    def __init__(self, request: Request, text, generator: torch.Generator | None):
        self.request, self.text, self.generator = request, text, generator
        self.status = WAITING
        self.row = -1  # SlotCache row while RUNNING
        self.stream = None  # TokenStream of the prompt while PREFILLING
        self.cache = None  # its KVCache
        self.steps = None  # its prefill_steps generator
        self.keys: dict[int, str] = {}  # prefix-cache keys by prefix length
        self.last_token = -1  # generated, not yet fed back
        self.position = len(request.prompt.ids) - 1  # of the last token in the cache
        self.shown = ""  # text already sent
        self.reason = MAX_NEW_TOKENS
        self.vision_seconds = self.prefill_seconds = 0.0
        self.started = self.first_token_at = self.last_token_at = 0.0

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt.ids)

    @property
    def new_tokens(self) -> int:
        return len(self.text.ids)
