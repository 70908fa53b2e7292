"""`Engine`: chat messages in, answers out; batching, streaming, stop strings and an image feature cache."""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openmedgemma.engine import hugepages
from openmedgemma.engine.cpu import detect as detect_cpu
from openmedgemma.engine.fast import DecoderRunner
from openmedgemma.engine.generate import DEFAULT_PREFILL_CHUNK, VISION_BATCH, TokenStream, iter_image_features
from openmedgemma.engine.quant import quantize as quantize_model
from openmedgemma.engine.quant import quantized_head
from openmedgemma.engine.sampling import GenerationConfig
from openmedgemma.errors import ImageError, OpenMedGemmaError
from openmedgemma.tokenizer.chat import IMAGE_KEYS
from openmedgemma.tokenizer.thinking import THOUGHT_END, THOUGHT_START, split_thinking

STOP_TOKEN, STOP_STRING, MAX_NEW_TOKENS = "stop_token", "stop_string", "max_new_tokens"


@dataclass
class GenerationResult:
    """One generated answer.

    text: the answer (thinking block removed, surrounding whitespace stripped, cut before a stop string);
    thought: the thinking block's text, or None; token_ids: the new ids (a final stop id included);
    stop_reason: "stop_token", "stop_string" or "max_new_tokens". Timings are those of the batch the
    row ran in: vision tower, prefill up to the first token, then decoding. inputs: what each volume or
    slide case of the prompt became (kind, source, preset, slice / patch counts; see imaging.inputs).
    """

    text: str
    thought: str | None
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    stop_reason: str
    vision_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    inputs: list[dict] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float:
        return self.vision_seconds + self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        inputs = {"inputs": self.inputs} if self.inputs else {}
        return {
            **inputs,
            "answer": self.text,
            "thought": self.thought,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "stop_reason": self.stop_reason,
            "timings": {
                "vision_seconds": round(self.vision_seconds, 6),
                "prefill_seconds": round(self.prefill_seconds, 6),
                "time_to_first_token_seconds": round(self.time_to_first_token, 6),
                "decode_seconds": round(self.decode_seconds, 6),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            },
        }


@dataclass
class _Prompt:
    ids: list[int]
    pixels: list[torch.Tensor] = field(default_factory=list)  # one [3, S, S] per image, prompt order: uint8
    # (resized, not yet normalized: a quarter of the memory) or float pixel values given by the caller
    inputs: list[dict] = field(default_factory=list)  # summaries of the volumes / slide cases expanded


class _RowText:
    """The text of one generated row, cut at the first stop string; what may be shown while streaming.

    live: decode token by token (needed for stop strings and streaming); otherwise the ids are decoded
    once at the end, which keeps the per-step cost of big batches down.
    """

    def __init__(self, tokenizer, config: GenerationConfig, live: bool):
        self.tokenizer, self.live = tokenizer, live
        self.decoder = tokenizer.incremental_decoder() if live else None
        self.stops = config.stop_strings
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.show_thinking = config.show_thinking
        self.ids: list[int] = []
        self.raw = ""

    def push(self, token_id: int) -> bool:
        """Add a generated (non-stop) token; True when the text now contains a stop string (the text is then
        cut before it)."""
        self.ids.append(token_id)
        return self._add(self.decoder.push(token_id)) if self.live else False

    def flush(self) -> bool:
        if not self.live:
            text_ids = self.ids[:-1] if self.ids and self.ids[-1] in self.tokenizer.stop_ids else self.ids
            self.raw = self.tokenizer.decode(text_ids)
            return False
        return self._add(self.decoder.flush())

    def _add(self, delta: str) -> bool:
        if not delta:
            return False
        start = max(0, len(self.raw) - self.hold)
        self.raw += delta
        hits = [i for i in (self.raw.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.raw = self.raw[: min(hits)]
        return bool(hits)

    def view(self, text: str) -> str:
        return (text if self.show_thinking else split_thinking(text)[1]).strip()

    def partial(self) -> str:
        """What can be shown now without ever being taken back: the text minus a possible stop-string
        start and a half-written thinking marker."""
        text = self.raw[: len(self.raw) - self.hold] if self.hold else self.raw
        for marker in (THOUGHT_START, THOUGHT_END):
            for k in range(len(marker) - 1, 0, -1):
                if text.endswith(marker[:k]):
                    text = text[:-k]
                    break
        return self.view(text)


def kernel_notice(model, mode: str, head=None) -> str:
    """One line: the weight format, the kernels its layers picked (their `kernel`) and the CPU behind the choice."""
    layers = [m for m in model.language_model.layers.modules() if hasattr(m, "kernel")] + ([head] if head else [])
    kernels = list(dict.fromkeys(m.kernel for m in layers))  # distinct, in order
    on_cpu = model.language_model.embed_tokens.weight.device.type == "cpu"
    buffers = [b for m in layers for b in m.buffers()]
    pages = f"; {hugepages.describe(buffers)}" if on_cpu and buffers else ""
    where = f"{pages}; CPU {detect_cpu().describe()}" if on_cpu else ""
    return f"openmedgemma: {mode} weights, {len(layers)} layers: {' | '.join(kernels)}{where}"


class Engine:
    """Generate answers to chat messages with a MedGemma model and its tokenizer.

        engine = Engine(MedGemma.from_pretrained(path), Tokenizer.from_pretrained(path))
        [result] = engine.generate([[{"role": "user", "content": "Hi"}]], GenerationConfig(max_new_tokens=64))
        for delta in engine.stream(messages): print(delta, end="")

    quantize: None or a weight format of `engine.quant.MODES` ("int4" weight-only, groups of 32 (q4_0's bits),
    "int8" weight-only, "int8-dynamic" (CPU), "bf16" and "fp16" weight-only, "fp32": the same values in the
    CPU decode kernel's blocks, ~1.4x a plain fp32 decode at 130M), applied to `model` in place;
    one line on stderr says which kernels were chosen for this CPU and why.
    max_batch_size: conversations generated together (sorted by length, so padding stays small).
    prefill_chunk: prompt tokens per prefill step (bounds activation memory for long prompts).
    compile: run decode steps compiled (opt-in: the first step compiles, tens of seconds on CPU;
    `decoder.compile_seconds` says how long): on the CPU ahead of time (torch.export + AOTInductor, kept on
    disk for later processes), else through `torch.compile`; "aot" / "dynamo" choose (`engine.fast`). Needs
    fast=True.
    relayout_weights: CPU fp32 only: re-lay out the decoder's linear weights in place so that a decode step's
    1-row matmuls stream them fastest and q/k/v and gate/up each run as one matmul (`engine.fast`; same
    values, no copy; `model.state_dict()` still gives contiguous tensors in the official layout). On by default.
    prepack_weights: CPU fp32 only: decode steps multiply through a second copy of the decoder's linear weights
    in oneDNN's blocked layout (`decoder.prepacked_bytes` says how much), which makes steps of several rows
    (batches, continuous batching) much cheaper; a one-row step runs as before. Off by default (memory).
    image_cache_size / image_cache_bytes: image features kept (by content hash of the pixels, at most this
    many and this many bytes), so asking again about an image, a volume or a slide case skips the vision
    tower; `vision_calls` counts the images the tower ran on. The defaults hold a full case (126 patches)
    at 4b in fp32 (2.6 MB per image).
    vision_batch: images per vision-tower call; its activation peak grows with it (at 896 px, SigLIP
    so400m takes ~0.1 GB per image and layer in bf16), not with the number of images in the prompt.
    Volumes, slide cases and multi-frame files in message content are expanded by
    `openmedgemma.imaging.inputs.expand_content` ({"type": "volume", ...}, {"type": "slides", ...}).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        quantize: str | None = None,
        image_cache_size: int = 256,
        fast: bool = True,
        compile: bool | str = False,
        prepack_weights: bool = False,
        relayout_weights: bool = True,
        vision_batch: int = VISION_BATCH,
        image_cache_bytes: int = 1 << 30,
    ):
        if max_batch_size < 1:
            raise OpenMedGemmaError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if vision_batch < 1:
            raise OpenMedGemmaError(f"vision_batch must be >= 1, got {vision_batch}")
        cfg = model.config
        if cfg.is_multimodal and tokenizer.image_token_id != cfg.image_token_index:
            raise OpenMedGemmaError(
                f"{tokenizer.source}: the tokenizer's image soft token is id {tokenizer.image_token_id} but the "
                f"model expects {cfg.image_token_index}; they do not belong together"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.head = None
        if quantize:
            quantize_model(model, quantize)
            self.head = quantized_head(model, quantize)
            print(kernel_notice(model, quantize, self.head), file=sys.stderr)
        if compile and not fast:
            raise OpenMedGemmaError("compile=True compiles the decode step of the engine's decoder runner; it needs fast=True")
        self.decoder = DecoderRunner(model.language_model, compile=compile, prepack=prepack_weights,
                                   relayout=relayout_weights) if fast else False  # fmt: skip
        self.image_cache_size, self.image_cache_bytes = image_cache_size, image_cache_bytes
        self.vision_batch = vision_batch
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_nbytes = 0
        self.vision_calls = 0
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, quantize: str | None = None, **kwargs) -> Engine:
        """Load the model and the tokenizer from one checkpoint folder."""
        from openmedgemma.model.medgemma import MedGemma
        from openmedgemma.tokenizer import Tokenizer

        model = MedGemma.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_pretrained(path), quantize=quantize, **kwargs)

    # ------------------------------------------------------------------ public

    def generate(self, batch: Sequence[Sequence[Mapping]], config: GenerationConfig | None = None,
                 ) -> list[GenerationResult]:  # fmt: skip
        """One result per conversation of `batch` (a list of message lists), in order."""
        config = config or GenerationConfig()
        if not isinstance(batch, Sequence) or (batch and isinstance(batch[0], Mapping)):
            raise OpenMedGemmaError("generate takes a list of conversations (each a list of messages); "
                                    "for one conversation pass [messages]")  # fmt: skip
        prompts = [self.prepare(messages) for messages in batch]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
        results: list[GenerationResult | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            run = self._run([prompts[i] for i in rows], config, live=bool(config.stop_strings))
            for row, result in zip(rows, _exhaust(run)):
                results[row] = result
        return results  # type: ignore[return-value]

    def stream(self, messages: str | Sequence[Mapping], config: GenerationConfig | None = None,
               **gen_kwargs) -> Generator[str, None, GenerationResult]:  # fmt: skip
        """Text deltas of the answer as it is generated; joined, they equal the final result's text
        (with `show_thinking`, the thinking block is streamed too). Never splits a character. The
        generator's return value (and `last_result`) is the GenerationResult. Keyword arguments are
        GenerationConfig fields (instead of `config`); a string is one user question."""
        config = _config(config, gen_kwargs)
        run = self._run([self.prepare(_messages(messages))], config, live=True)
        shown = ""
        while True:
            try:
                rows = next(run)
            except StopIteration as stop:
                result = stop.value[0]
                break
            now = rows[0].partial()
            if len(now) > len(shown) and now.startswith(shown):
                yield now[len(shown) :]
                shown = now
        final = rows[0].view(rows[0].raw)  # the answer (result.text), or everything with show_thinking
        if len(final) > len(shown) and final.startswith(shown):
            yield final[len(shown) :]
        return result

    def chat(self, messages: str | Sequence[Mapping], config: GenerationConfig | None = None, *,
             return_result: bool = False, **gen_kwargs):  # fmt: skip
        """The answer to `messages` (a list of messages, or one user question as a string)."""
        [result] = self.generate([_messages(messages)], _config(config, gen_kwargs))
        return result if return_result else result.text

    # ------------------------------------------------------------------ pieces

    def prepare(self, messages: Sequence[Mapping]) -> _Prompt:
        """Prompt ids (images expanded to their soft tokens) and pixel values of one conversation.

        Volumes and slide cases in the content become their images and labels first; a prompt longer than
        the model's context is an error when it holds a volume or slide case (saying how many slices fit)."""
        from openmedgemma.imaging.inputs import expand_content

        cfg = self.model.config
        messages, inputs = expand_content(messages)
        images = _images_of(messages)
        if images and not cfg.is_multimodal:
            raise OpenMedGemmaError(f"{getattr(self.model, 'source', 'this model')}: a text-only checkpoint cannot "
                                    "take images")  # fmt: skip
        pixels = [self._pixels(image) for image in images]
        ids = self.tokenizer.encode_chat(messages, image_seq_length=cfg.mm_tokens_per_image)
        vocab = cfg.text.vocab_size
        bad = [i for i in ids if i >= vocab and i != cfg.image_token_index]
        if bad:
            raise OpenMedGemmaError(f"{self.tokenizer.source}: token id {bad[0]} is beyond the model's vocabulary "
                                    f"({vocab}); the tokenizer does not belong to this model")  # fmt: skip
        group = next(_groups_of(messages), None)
        if group is not None and len(ids) >= cfg.text.max_position_embeddings:
            raise self._too_long(messages, len(ids), group)
        return _Prompt(ids, pixels, inputs)

    def _too_long(self, messages, length: int, group: tuple[str, int, str]) -> OpenMedGemmaError:
        """The error for a volume / slide case that leaves no room for an answer: how many slices fit. (Other
        prompts are not refused here: RoPE runs past the trained length, and servers set their own limit.)"""
        from openmedgemma.imaging.inputs import without_group

        context = self.model.config.text.max_position_embeddings
        source, count, unit = group
        rest = len(self.tokenizer.encode_chat(without_group(messages, source),
                                              image_seq_length=self.model.config.mm_tokens_per_image))  # fmt: skip
        per = (length - rest) / count  # tokens per slice / patch, its label included
        fit = max(0, int((context - 1 - rest) // per))
        option = "max_slices / --max-slices" if unit == "slices" else "max_patches / --max-patches"
        return OpenMedGemmaError(f"{source}: {count} {unit} make a prompt of {length:,} tokens but this model's "
                                 f"context is {context:,}: at most {fit} {unit} fit (set {option} to {fit} "
                                 "or fewer)")  # fmt: skip

    def _pixels(self, image) -> torch.Tensor:
        size = self.model.config.vision.image_size
        if isinstance(image, torch.Tensor):  # already pixel values
            if image.shape != (3, size, size):
                raise ImageError(f"pixel values must be [3, {size}, {size}], got {list(image.shape)}")
            return image.float().cpu()
        from openmedgemma.imaging.pixel_values import to_resized_uint8

        if isinstance(image, (str, Path)):
            text = str(image)
            if text.startswith(("http://", "https://")):
                raise ImageError(f"{text}: images are read from local files only (no network access)")
            from openmedgemma.imaging.loader import load_image

            image = load_image(image)
        return to_resized_uint8([image], size=size)[0]

    def _features_for(self, prompts: list[_Prompt]) -> list[torch.Tensor | None]:
        """Image features per prompt; the vision tower runs once on the images not in the cache, `vision_batch`
        images at a time, each batch's output written straight into the per-prompt tensors (memory: those
        tensors plus one batch, whatever the number of images)."""
        keys = [[_content_key(px) for px in p.pixels] for p in prompts]
        places: dict[str, list[tuple[int, int]]] = {}  # key -> (prompt, image index) it fills
        for row, row_keys in enumerate(keys):
            for i, key in enumerate(row_keys):
                places.setdefault(key, []).append((row, i))
        out: list[torch.Tensor | None] = [None] * len(prompts)

        def place(key: str, feat: torch.Tensor) -> None:
            for row, i in places[key]:
                if out[row] is None:
                    out[row] = feat.new_empty((len(keys[row]), *feat.shape))
                out[row][i] = feat

        missing: dict[str, torch.Tensor] = {}
        for key in places:  # cached features are read before anything new is stored (storing may evict)
            if key in self._features:
                place(key, self._features[key])
            else:
                missing[key] = next(prompts[row].pixels[i] for row, i in places[key][:1])
        pending = list(missing)
        for feats in iter_image_features(self.model, list(missing.values()), self.vision_batch):
            for feat in feats:
                place(pending.pop(0), feat)
        self.vision_calls += len(missing)
        for key, where in places.items():  # most recently used last; the cache holds views of `out`
            if key in self._features:
                self._features.move_to_end(key)
            else:
                row, i = where[0]
                self._remember(key, out[row][i])
        return out

    def _remember(self, key: str, feat: torch.Tensor) -> None:
        size = feat.numel() * feat.element_size()
        if self.image_cache_size <= 0 or size > self.image_cache_bytes:
            return
        self._features[key] = feat
        self._cache_nbytes += size
        while len(self._features) > self.image_cache_size or self._cache_nbytes > self.image_cache_bytes:
            _, old = self._features.popitem(last=False)
            self._cache_nbytes -= old.numel() * old.element_size()

    def _run(self, prompts: list[_Prompt], config: GenerationConfig,
             live: bool) -> Generator[list[_RowText], None, list[GenerationResult]]:  # fmt: skip
        """Generate for one batch; yields the rows' text state after each step, returns the results."""
        t0 = time.perf_counter()
        features = self._features_for(prompts)
        vision_seconds = time.perf_counter() - t0
        stream = TokenStream(self.model, [p.ids for p in prompts], features, config, prefill_chunk=self.prefill_chunk,
                             head=self.head, fast=self.decoder, pad_id=self.tokenizer.pad_id)  # fmt: skip
        rows = [_RowText(self.tokenizer, config, live) for _ in prompts]
        reasons = [MAX_NEW_TOKENS] * len(prompts)
        stop_ids = set(self.tokenizer.stop_ids)
        for tokens in stream:
            for i, token in enumerate(tokens):
                if stream.done[i]:
                    continue
                if token in stop_ids:
                    rows[i].ids.append(token)
                    reasons[i], stream.done[i] = STOP_TOKEN, True
                elif rows[i].push(token):
                    reasons[i], stream.done[i] = STOP_STRING, True
            yield rows
        results = []
        for row, prompt, reason in zip(rows, prompts, reasons):
            if reason != STOP_STRING and row.flush():
                reason = STOP_STRING
            thought, answer = split_thinking(row.raw)
            results.append(GenerationResult(
                text=answer.strip(), thought=thought, token_ids=list(row.ids), prompt_tokens=len(prompt.ids),
                new_tokens=len(row.ids), stop_reason=reason, vision_seconds=vision_seconds,
                prefill_seconds=stream.prefill_seconds, decode_seconds=stream.decode_seconds, inputs=prompt.inputs,
            ))  # fmt: skip
        self.last_result = results[-1]
        return results


def engine_for(model) -> Engine:
    """The Engine `MedGemma.chat` / `.stream` use: made once per model, with the tokenizer of the folder
    the model was loaded from."""
    engine = model.__dict__.get("_engine")
    if engine is None:
        source = getattr(model, "source", None)
        if source is None:
            raise OpenMedGemmaError("this model was not loaded from a folder, so it has no tokenizer; "
                                    "use openmedgemma.engine.Engine(model, tokenizer)")  # fmt: skip
        from openmedgemma.tokenizer import Tokenizer

        engine = Engine(model, Tokenizer.from_pretrained(source))
        model.__dict__["_engine"] = engine
    return engine


def _messages(messages) -> Sequence[Mapping]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _config(config: GenerationConfig | None, gen_kwargs: dict) -> GenerationConfig:
    if config is not None and gen_kwargs:
        raise OpenMedGemmaError(f"give a GenerationConfig or its fields as keywords, not both ({sorted(gen_kwargs)})")
    if config is not None:
        return config
    try:
        return GenerationConfig(**gen_kwargs)
    except TypeError as err:
        raise OpenMedGemmaError(f"unknown generation option: {err}") from None


def _exhaust(gen: Generator) -> Any:
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _content_key(pixels: torch.Tensor) -> str:
    data = pixels.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    return digest.hexdigest()


def _groups_of(messages: Sequence[Mapping]):
    """(source, count, unit) of each volume / slide case in the content, as `expand_content` tags them."""
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, Sequence) and not isinstance(content, str):
            seen = {}
            for item in content:
                group = item.get("group") if isinstance(item, Mapping) else None
                if group and item.get("type") == "image":
                    seen.setdefault(group["source"], [0, group["unit"]])[0] += 1
            yield from ((source, count, unit) for source, (count, unit) in seen.items())


def _images_of(messages: Sequence[Mapping]) -> list:
    """The images of image items, in prompt order (the tokenizer checks the rest of the format)."""
    images = []
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        return images  # the tokenizer reports the format error
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for item in content:
            if isinstance(item, Mapping) and item.get("type") == "image":
                image = next((item[k] for k in IMAGE_KEYS if item.get(k) is not None), None)
                if image is None:
                    raise ImageError(f"chat message {index}: an image item carries no image (give it under 'image')")
                images.append(image)
    return images
