"""Continuous (iteration-level) batching: one thread owns the model and, at every step,

1. retires cancelled sequences (their rows are freed at once),
2. decodes one token for every running sequence, in one batched forward over `SlotCache` rows,
3. admits waiting requests up to `max_batch` and prefills them in chunks under a per-step token
   budget, so a long prompt never stalls the streams already running for more than one chunk.

A sequence joins the running batch as soon as its prefill ends and leaves it the step it finishes,
so short answers never wait for long ones (vLLM's and Orca's scheme, without paging: each running
sequence owns one preallocated cache row of `max_model_len` slots).

Results do not depend on the batch: each row attends only to its own keys, samples from its own
generator (seeded per request), and a single running sequence takes exactly `Engine`'s decode step.
Across batch sizes, greedy tokens can differ only where float summation order in the batched matmul
turns an exact tie (the tests compare batched and alone answers token for token).

Prefix cache: after a prompt is prefilled its cache is kept (LRU, bounded in bytes) under the hash of
its tokens and images, and so is a copy taken where its last image ends; a later prompt starting with
either skips that part of the prefill (a repeated question, a regenerate, a second question about the
same image and system prompt, the next turn of a conversation). Prefill chunks always end at the
image boundary, so a prompt gives the same numbers whether or not it hit the cache.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque

import torch

from openmedgemma.engine.cache import KVCache, SlotCache, grown
from openmedgemma.engine.engine import Engine, GenerationResult, _content_key, _RowText
from openmedgemma.engine.generate import TokenStream
from openmedgemma.engine.sampling import next_tokens
from openmedgemma.engine.sequences import (
    CANCELLED, FINISHED, PREFILLING, RUNNING, STOP_STRING, STOP_TOKEN, Delta, Finished, Request, Sequence,
    TokenLogprob,
)  # fmt: skip
from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.tokenizer.thinking import split_thinking

DEFAULT_PREFILL_BUDGET = 512
DEFAULT_MAX_MODEL_LEN = 8192  # rows are preallocated: the 4B's 128k context x 16 rows would need ~100 GB fp32


class QueueFull(OpenMedGemmaError):
    """More requests are waiting than the server accepts; retry later."""


class ContextTooLong(OpenMedGemmaError):
    """The prompt plus the tokens asked for do not fit the model's context."""


class Scheduler:
    """Continuous batching over an `Engine`'s model, tokenizer, head and image cache.

        scheduler = Scheduler(engine, max_batch=16).start()
        scheduler.submit(Request(engine.prepare(messages), config, on_event=print))

    max_batch: sequences decoded together (cache rows); max_queue: requests waiting beyond those
    (`submit` raises QueueFull past it); max_model_len: prompt + answer tokens per sequence (default
    the model's context, at most 8192; every row holds that many, so it sizes the KV cache); prefill_budget: prompt tokens prefilled per step; prefix_cache_bytes: the
    prefix cache's size (0: off). observer: optional metrics hooks (see `serve.metrics`).
    """

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 256, max_model_len: int | None = None,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, prefix_cache_bytes: int = 256 << 20,
                 observer=None):  # fmt: skip
        if max_batch < 1 or max_queue < 0 or prefill_budget < 1:
            raise OpenMedGemmaError("max_batch and prefill_budget must be >= 1, max_queue >= 0")
        model = engine.model
        self.engine, self.model, self.tokenizer = engine, model, engine.tokenizer
        if engine.decoder and engine.decoder.compile:
            raise OpenMedGemmaError("the scheduler runs eager decode steps; use an Engine without compile=True")
        context = model.config.text.max_position_embeddings
        self.max_model_len = min(max_model_len or min(context, DEFAULT_MAX_MODEL_LEN), context)
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.kv_bytes = SlotCache.nbytes_for(model.language_model.config, max_batch, self.max_model_len, model.dtype)
        _check_memory(self.kv_bytes, model.device, max_batch, self.max_model_len)
        self.slots = SlotCache(model.language_model.config, max_batch, self.max_model_len, model.dtype, model.device)
        self.prefixes = _PrefixCache(prefix_cache_bytes)
        self.observer = observer
        self.stop_ids = set(self.tokenizer.stop_ids)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # index = SlotCache row
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = self._stopped = False
        self.steps = 0

    # ------------------------------------------------------------------ public

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="openmedgemma-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request) -> Sequence:
        """Queue a request; its events go to `request.on_event` from the scheduler thread."""
        need = len(request.prompt.ids) + request.config.max_new_tokens
        if need > self.max_model_len:
            raise ContextTooLong(
                f"the prompt is {len(request.prompt.ids)} tokens and {request.config.max_new_tokens} new tokens "
                f"were asked for: {need} > the context of {self.max_model_len} tokens"
            )
        generator = None
        if not request.config.greedy and request.config.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(request.config.seed)
        seq = Sequence(request, _RowText(self.tokenizer, request.config, live=True), generator)
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - self.active):
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue}); retry later")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    @property
    def active(self) -> int:
        return len(self.running) + len(self.prefilling)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish those admitted or waiting first; then end the thread."""
        with self._cond:
            self._closing = True
            if not drain:
                for seq in [*self.waiting, *self.prefilling, *self.running]:
                    seq.request.cancel()
            self._cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.waiting or self.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left if left is not None else 0.1)
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.active or self._stopped):
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as err:  # a bug or an out-of-memory: fail what is in flight, keep serving
                for seq in [*self.prefilling, *self.running]:
                    self._finish(seq, CANCELLED, error=err)
            with self._cond:
                self._cond.notify_all()

    def step(self) -> None:
        """One iteration: retire cancelled, decode the running batch, admit and prefill under the budget."""
        self.steps += 1
        with self._cond:
            for seq in [s for s in self.waiting if s.request.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, CANCELLED)
            admitted = []
            while self.waiting and self.active + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        for seq in [*self.prefilling, *self.running]:
            if seq.request.cancelled:
                self._finish(seq, CANCELLED)
        if self.running:
            self._decode()
        for seq in admitted:
            self._admit(seq)
        budget = self.prefill_budget
        for seq in list(self.prefilling):
            while budget > 0 and seq.status == PREFILLING:
                t0 = time.perf_counter()
                try:
                    budget -= next(seq.steps)
                    self._maybe_snapshot(seq)
                except StopIteration as done:
                    self._prefilled(seq, done.value)
                seq.prefill_seconds += time.perf_counter() - t0
            if budget <= 0:
                break
        if self.observer is not None:
            self.observer.step(running=self.active, waiting=len(self.waiting), batch=len(self.running))

    # ------------------------------------------------------------------ prefill

    def _admit(self, seq: Sequence) -> None:
        """Vision tower (through the engine's image cache), prefix-cache lookup, prefill plan."""
        prompt = seq.request.prompt
        seq.started = time.perf_counter()
        try:
            [features] = self.engine._features_for([prompt])
            seq.vision_seconds = time.perf_counter() - seq.started
            stream = TokenStream(self.model, [prompt.ids], [features], seq.request.config,
                                 prefill_chunk=self.prefill_budget, head=self.engine.head,
                                 fast=self.engine.decoder, pad_id=self.tokenizer.pad_id)  # fmt: skip
        except Exception as err:
            self._finish(seq, CANCELLED, error=err)
            return
        seq.stream, seq.status = stream, PREFILLING
        seq.keys = _prefix_keys(prompt, stream, self.model.config.image_token_index)
        self.prefilling.append(seq)
        length = len(prompt.ids)
        hit = self.prefixes.get(seq.keys[length]) if length in seq.keys else None
        if hit is not None:  # the whole prompt: its cache and last hidden state are ready
            seq.cache, hidden = hit
            seq.steps = iter(())
            self._prefilled(seq, hidden)
            return
        start, base = 0, None
        for boundary in sorted((b for b in seq.keys if b < length), reverse=True):
            base = self.prefixes.get(seq.keys[boundary])
            if base is not None:
                start = boundary
                break
        seq.cache = grown(base[0], length) if base is not None else KVCache(
            self.model.language_model.config, 1, length, self.model.dtype, self.model.device)  # fmt: skip
        seq.steps = stream.prefill_steps(seq.cache, start, stops=list(seq.keys))

    def _maybe_snapshot(self, seq: Sequence) -> None:
        key = seq.keys.get(seq.cache.length)
        if key is not None and seq.cache.length < len(seq.request.prompt.ids) and self.prefixes.enabled:
            self.prefixes.put(key, (grown(seq.cache, seq.cache.length), None))

    def _prefilled(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Prompt done: sample the first token, keep the prompt's cache, move the sequence to a row."""
        self.prefilling.remove(seq)
        length = len(seq.request.prompt.ids)
        if self.prefixes.enabled and length in seq.keys:
            self.prefixes.put(seq.keys[length], (seq.cache, hidden))  # never written again: shared as is
        with torch.inference_mode():
            logits = self.engine.head(hidden) if self.engine.head else self.model.logits(hidden)
        seq.status = RUNNING
        seq.row = len(self.running)
        self.running.append(seq)
        self.slots.load(seq.row, seq.cache)
        seq.cache = seq.stream = seq.steps = None
        self._sample([seq], logits)

    # ------------------------------------------------------------------ decode

    def _decode(self) -> None:
        running = self.running
        device = self.model.device
        tokens = torch.tensor([s.last_token for s in running], device=device)
        positions = torch.tensor([[s.position + 1] for s in running], device=device)
        with torch.inference_mode():
            masks = self.slots.begin(positions)
            decoder = self.engine.decoder
            if decoder:
                hidden = decoder.decode(tokens, positions, masks, self.slots)
            else:
                lm = self.model.language_model
                hidden = lm(lm.embed(tokens[:, None]), positions, masks, self.slots)[:, -1]
            logits = self.engine.head(hidden) if self.engine.head else self.model.logits(hidden)
        for seq in running:
            seq.position += 1
        self._sample(list(running), logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each row's next token with its own sampling settings; then stop checks and events."""
        with torch.inference_mode():
            chosen = logits.argmax(-1).tolist()
            for i, seq in enumerate(seqs):
                if not seq.request.config.greedy:
                    chosen[i] = int(next_tokens(logits[i : i + 1], seq.request.config, seq.generator))
            want = [i for i, s in enumerate(seqs) if s.request.logprobs is not None]
            logprobs = {}
            if want:
                lp = torch.log_softmax(logits[want].float(), -1)
                for j, i in enumerate(want):
                    k = seqs[i].request.logprobs
                    top = torch.topk(lp[j], k) if k else None
                    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                    logprobs[i] = TokenLogprob(chosen[i], float(lp[j, chosen[i]]), alts)
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, chosen)):
            first = not seq.text.ids
            if first:
                seq.first_token_at = now
                if self.observer is not None:
                    self.observer.first_token(now - seq.request.arrival)
            elif self.observer is not None:
                self.observer.token(now - seq.last_token_at)
            seq.last_token_at = now
            seq.last_token = token
            lps = [logprobs[i]] if i in logprobs else None
            if token in self.stop_ids and not seq.request.ignore_eos:
                seq.text.ids.append(token)
                self._finish(seq, STOP_TOKEN, logprobs=lps)
            elif seq.text.push(token):
                self._finish(seq, STOP_STRING, logprobs=lps)
            elif seq.new_tokens >= seq.request.config.max_new_tokens:
                self._finish(seq, seq.reason, logprobs=lps)
            else:
                now_text = seq.text.partial()
                delta = ""
                if len(now_text) > len(seq.shown) and now_text.startswith(seq.shown):
                    delta, seq.shown = now_text[len(seq.shown) :], now_text
                seq.request.on_event(Delta(delta, [token], lps))

    # ------------------------------------------------------------------ retire

    def _finish(self, seq: Sequence, reason: str, *, logprobs=None, error: Exception | None = None) -> None:
        if seq.status == RUNNING:
            last = len(self.running) - 1
            if seq.row != last:
                self.slots.move(last, seq.row)
                self.running[seq.row] = self.running[last]
                self.running[seq.row].row = seq.row
            self.running.pop()
        elif seq.status == PREFILLING:
            self.prefilling.remove(seq)
        seq.status, seq.row = FINISHED, -1
        seq.cache = seq.stream = seq.steps = None
        result, rest = None, ""
        if reason != CANCELLED and error is None:
            if reason != STOP_STRING and seq.text.flush():
                reason = STOP_STRING
            final = seq.text.view(seq.text.raw)
            rest = final[len(seq.shown) :] if final.startswith(seq.shown) else ""
            thought, answer = split_thinking(seq.text.raw)
            end = time.perf_counter()
            result = GenerationResult(
                text=answer.strip(), thought=thought, token_ids=list(seq.text.ids), prompt_tokens=seq.prompt_tokens,
                new_tokens=seq.new_tokens, stop_reason=reason, vision_seconds=seq.vision_seconds,
                prefill_seconds=seq.first_token_at - seq.started - seq.vision_seconds,
                decode_seconds=end - seq.first_token_at,
            )  # fmt: skip
        if self.observer is not None:
            self.observer.finished(seq, reason, error)
        seq.request.on_event(Finished(rest, result, reason, logprobs, error))


def _check_memory(need: int, device, rows: int, length: int) -> None:
    """Refuse a KV cache that cannot fit, before allocating it, with the knobs that shrink it."""
    import psutil

    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise OpenMedGemmaError(
            f"the KV cache for {rows} rows x {length} tokens needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB "
            "are free; lower --max-batch or --max-model-len"
        )


class _PrefixCache:
    """LRU of prompt-prefix caches: key -> (KVCache, last hidden state or None), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[str, tuple[KVCache, torch.Tensor | None]] = OrderedDict()
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: str, entry) -> None:
        size = entry[0].nbytes
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.bytes -= old.nbytes


def _prefix_keys(prompt, stream: TokenStream, image_token: int) -> dict[int, str]:
    """{prefix length: key} for the whole prompt and, when text follows its last image, for the prefix
    ending at that image. Keys hash the token ids and the images' pixel content."""
    ids = prompt.ids
    bounds = [len(ids)]
    if prompt.pixels and ids[-1] != image_token:
        last_image_end = max(i for i, t in enumerate(ids) if t == image_token) + 1
        bounds.append(last_image_end)
    image_keys = [_content_key(px) for px in prompt.pixels]
    keys = {}
    for bound in bounds:
        n_images = int(stream.images_before[0, bound])
        digest = hashlib.blake2b(torch.tensor(ids[:bound], dtype=torch.int64).numpy().tobytes(), digest_size=16)
        digest.update("|".join(image_keys[:n_images]).encode())
        keys[bound] = digest.hexdigest()
    return keys
