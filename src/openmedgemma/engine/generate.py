"""The generation loop: chunked prefill into a preallocated KV cache, then one token per step.

Prompts of different lengths run together left-padded on one time axis: a row's positions count its
real tokens only and padding keys are masked, so each row gets the tokens it would get alone.

Prompt-lookup decoding (`GenerationConfig.prompt_lookup_tokens`): a step may feed the last token plus
drafts from `engine.lookup` (T = 1 + drafts tokens, one forward); the drafts equal to the model's own
greedy choices are kept, with the model's token after them, and the cache rolls back the rest. The
tokens are those of plain greedy decoding: each is the argmax of the same function of the same
prefix (the multi-token forward rounds differently from a one-token step, as prefill does, so a
near-exact tie between two logits could in principle break the other way).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Generator, Iterator, Sequence

import torch

from openmedgemma.engine.cache import KVCache
from openmedgemma.engine.fast import DecoderRunner
from openmedgemma.engine.lookup import PromptLookup
from openmedgemma.engine.quant import Int8Linear
from openmedgemma.engine.sampling import GenerationConfig, next_tokens
from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.model.masks import image_block_ids

DEFAULT_PREFILL_CHUNK = 2048
VISION_BATCH = 8  # default images per vision-tower call: bounds its activations (an 896 px image is 4096 patches)


def plan_chunks(is_image: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """[start, end) time ranges of at most `chunk` steps that never split a run of image soft tokens.

    is_image [B, L]: a boundary between two image tokens of any row is forbidden (that run is one image
    whose tokens attend to each other both ways); a chunk then ends before the run, or, when the run
    starts the chunk, after it (so a chunk can exceed `chunk` by less than one image).
    """
    if chunk < 1:
        raise OpenMedGemmaError(f"prefill_chunk must be >= 1, got {chunk}")
    length = is_image.shape[1]
    inside = (is_image[:, 1:] & is_image[:, :-1]).any(0)  # inside[b - 1]: boundary b splits an image
    allowed = [b for b in (~inside).nonzero().flatten().add(1).tolist()] + [length]
    chunks, start = [], 0
    while start < length:
        end = min(start + chunk, length)
        i = bisect.bisect_right(allowed, end) - 1  # the last allowed boundary <= end
        if i < 0 or allowed[i] <= start:
            end = allowed[bisect.bisect_right(allowed, start)]  # the first allowed boundary after start
        else:
            end = allowed[i]
        chunks.append((start, end))
        start = end
    return chunks


class TokenStream:
    """Iterate to run generation: each step yields the list of B new token ids.

    Set `done[i] = True` to stop computing for row i (the loop ends when every row is done or after
    `config.max_new_tokens` steps). Rows that are done still ride along in the batch (static shapes).
    features: per prompt, the image features [n_images, tokens_per_image, hidden] or None.
    head: hidden [B, H] -> logits [B, V]; the model's tied head by default.
    fast: run the decoder through a `DecoderRunner` (the model's forward with the engine's weight layout and
    kernels, engine/fast.py; pass one to reuse it), or False for the model's modules exactly as they are.

    With `config.prompt_lookup_tokens` > 0, greedy and one prompt, decoding is speculative (see the
    module doc); the tokens accepted in one step are still yielded one per step, and none is computed
    further once `done` is set. Sampling, batches of several prompts (the drafts of one row could not
    be accepted apart from the others' on one time axis) and int8-dynamic layers decode plainly.
    `verify_steps`, `drafted` and `accepted` count the multi-token steps, the draft tokens they checked
    and those kept.
    """

    def __init__(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        features: Sequence[torch.Tensor | None],
        config: GenerationConfig,
        *,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pad_id: int = 0,
        fast: bool | DecoderRunner = True,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise OpenMedGemmaError("generation needs at least one prompt, and no prompt may be empty")
        if len(features) != len(prompts):
            raise OpenMedGemmaError(f"{len(prompts)} prompts but {len(features)} image entries")
        self.model, self.config, self.prefill_chunk = model, config, prefill_chunk
        lm = model.language_model
        self.decoder = fast if isinstance(fast, DecoderRunner) else DecoderRunner(lm) if fast else None
        self.head = head or (self.decoder.logits if self.decoder is not None else model.logits)
        self.done = [False] * len(prompts)
        device = model.device
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            valid[row, length - len(prompt) :] = True
        self.ids, self.valid = ids.to(device), valid.to(device)
        self.positions = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        self.max_padding = length - min(len(p) for p in prompts)
        self.features = list(features)
        self._check_images()
        self.cache: KVCache | None = None
        self.prefill_seconds = self.decode_seconds = 0.0
        self.verify_steps = self.drafted = self.accepted = 0

    def _check_images(self) -> None:
        cfg = self.model.config
        per = cfg.mm_tokens_per_image
        is_image = (self.ids == cfg.image_token_index) & self.valid
        self.is_image = is_image
        counts = is_image.sum(1).tolist()
        for row, (n_tokens, feats) in enumerate(zip(counts, self.features)):
            n_feats = 0 if feats is None else feats.shape[0] * feats.shape[1]
            if n_tokens and not cfg.is_multimodal:
                raise OpenMedGemmaError("this is a text-only checkpoint; its prompts cannot hold image soft tokens")
            if n_tokens != n_feats:
                raise OpenMedGemmaError(
                    f"prompt {row} holds {n_tokens} image soft tokens ({n_tokens / per:g} images of {per}) "
                    f"but {n_feats // per} image(s) were given"
                )
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        # images started before time step t, per row: [B, L + 1]
        self.images_before = torch.nn.functional.pad(starts.long().cumsum(1), (1, 0)).cpu()

    def prefill_steps(self, cache: KVCache, start: int = 0, stops: Sequence[int] = ()
                      ) -> Generator[int, None, torch.Tensor]:  # fmt: skip
        """Prefill time steps [start, L) into `cache` (which holds steps [0, start)), one chunk per
        `next()` (each yields the chunk's token count); returns the last position's hidden states [B, H].

        Chunks also end at each of `stops` (the engine's prefix cache snapshots there). The continuous-
        batching scheduler steps this to interleave prefill with other sequences' decoding.
        """
        model, decoder = self.model, self.decoder or self.model.language_model
        multimodal = model.config.is_multimodal
        hidden = None
        bounds = sorted({start, self.ids.shape[1], *(s for s in stops if start < s < self.ids.shape[1])})
        with torch.inference_mode():
            for lo, hi in zip(bounds, bounds[1:]):
                for a, b in plan_chunks(self.is_image[:, lo:hi], self.prefill_chunk):
                    a, b = a + lo, b + lo
                    ids = self.ids[:, a:b]
                    x = model.embed(ids, self._chunk_features(a, b))
                    blocks = image_block_ids(ids, model.config.image_token_index) if multimodal else None
                    positions = self.positions[:, a:b]
                    masks = cache.begin(positions, self.valid[:, a:b], blocks, padded=a < self.max_padding)
                    hidden = decoder(x, positions, masks, cache)
                    yield b - a
        return hidden[:, -1]

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int]]:
        model, config = self.model, self.config
        lm = model.language_model
        t_start = time.perf_counter()
        batch, length = self.ids.shape
        self.cache = cache = KVCache(lm.config, batch, length + config.max_new_tokens, model.dtype, model.device)
        generator = None
        if not config.greedy and config.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(config.seed)

        steps = self.prefill_steps(cache)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                hidden = done.value
                break
        tokens = next_tokens(self.head(hidden), config, generator)
        token_list = tokens.tolist()
        self.prefill_seconds = time.perf_counter() - t_start
        t_decode = time.perf_counter()
        yield token_list

        positions = self.positions[:, -1:]
        lookup = self._lookup(token_list)
        emitted = 1
        while emitted < config.max_new_tokens and not all(self.done):
            drafts = []
            if lookup is not None:  # the step's tokens must fit max_new_tokens and the sliding layers' ring
                drafts = lookup.draft(min(config.prompt_lookup_tokens, config.max_new_tokens - emitted - 1,
                                          cache.ring - 1))  # fmt: skip
            if drafts:
                new = [[token] for token in self._verify(token_list[0], drafts, positions)]
                tokens = torch.tensor(new[-1], device=tokens.device)
                positions = positions + len(new)
            else:
                positions = positions + 1
                masks = cache.begin(positions)
                if self.decoder is not None:
                    hidden = self.decoder.decode(tokens, positions, masks, cache)
                else:
                    hidden = lm(lm.embed(tokens[:, None]), positions, masks, cache)[:, -1]
                tokens = next_tokens(self.head(hidden), config, generator)
                new = [tokens.tolist()]
            for token_list in new:
                if lookup is not None:
                    lookup.append(token_list[0])
                emitted += 1
                self.decode_seconds = time.perf_counter() - t_decode
                yield token_list
                if all(self.done):  # a stop the caller reacted to: the rest of the run is never shown
                    break

    def _lookup(self, first: list[int]) -> PromptLookup | None:
        """The draft index over the prompt's text ids and the first token, or None to decode plainly.

        Not with int8-dynamic layers: they quantize their input per tensor, so a row's output depends on
        the other rows of a multi-token step, and a verify step would not compute decoding's function."""
        cfg = self.config
        if cfg.prompt_lookup_tokens < 1 or not cfg.greedy or len(self.done) != 1 or self.cache.ring < 2:
            return None
        modules = [self.head, *self.model.language_model.modules()]
        if any(isinstance(m, Int8Linear) and m.mode == "int8-dynamic" for m in modules):
            return None
        ids = self.ids[0][self.valid[0]].tolist()
        image = self.model.config.image_token_index
        return PromptLookup(cfg.prompt_lookup_ngram, [None if i == image else i for i in ids] + first)

    def _verify(self, last: int, drafts: list[int], positions: torch.Tensor) -> list[int]:
        """One forward over [last, *drafts] at the positions after `positions` [1, 1]: the model's greedy
        tokens up to and including its first disagreement with the drafts (at least one), the cache
        rolled back to hold `last` and the drafts kept."""
        lm, cache = self.model.language_model, self.cache
        ids = torch.tensor([[last, *drafts]], device=positions.device)
        steps = positions + 1 + torch.arange(ids.shape[1], device=positions.device)
        masks = cache.begin(steps, reversible=True)
        decoder = self.decoder if self.decoder is not None else lm  # the generic multi-token forward
        hidden = decoder(lm.embed(ids), steps, masks, cache)  # [1, T, H]
        choices = self.head(hidden[0]).argmax(-1).tolist()
        kept = 0
        while kept < len(drafts) and drafts[kept] == choices[kept]:
            kept += 1
        cache.rollback(cache.length - len(drafts) + kept)
        self.verify_steps += 1
        self.drafted += len(drafts)
        self.accepted += kept
        return choices[: kept + 1]

    def _chunk_features(self, start: int, end: int) -> torch.Tensor | None:
        first, last = self.images_before[:, start].tolist(), self.images_before[:, end].tolist()
        parts = [self.features[row][a:b] for row, (a, b) in enumerate(zip(first, last)) if b > a]
        return torch.cat(parts) if parts else None


@torch.inference_mode()
def image_features(model, pixel_values: torch.Tensor | Sequence[torch.Tensor], batch: int = VISION_BATCH,
                   ) -> torch.Tensor:  # fmt: skip
    """The vision tower + projector over [N, 3, H, W] (or N tensors [3, H, W]): [N, tokens_per_image, hidden]."""
    return torch.cat(list(iter_image_features(model, pixel_values, batch)))


@torch.inference_mode()
def iter_image_features(model, pixel_values: torch.Tensor | Sequence[torch.Tensor], batch: int = VISION_BATCH,
                        ) -> Iterator[torch.Tensor]:  # fmt: skip
    """`image_features` one batch of at most `batch` images at a time, so the tower's activations (and the
    float pixels: uint8 images from `to_resized_uint8` are normalized here) never exceed one batch."""
    if batch < 1:
        raise OpenMedGemmaError(f"vision_batch must be >= 1, got {batch}")
    from openmedgemma.imaging.pixel_values import normalize_pixels

    for start in range(0, len(pixel_values), batch):
        part = pixel_values[start : start + batch]
        if not isinstance(part, torch.Tensor):
            part = torch.stack([normalize_pixels(px) if px.dtype == torch.uint8 else px.float() for px in part])
        elif part.dtype == torch.uint8:
            part = normalize_pixels(part)
        yield model.image_features(part.to(model.device))


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    images: Sequence[torch.Tensor | None] | None = None,
    config: GenerationConfig | None = None,
    stop_ids: Sequence[int] = (),
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    fast: bool | DecoderRunner = True,
) -> list[list[int]]:
    """New token ids per prompt, generated together in one batch.

    prompts: token ids (image soft tokens already expanded, as `Tokenizer.encode_chat` gives them);
    images: per prompt, its pixel values [n, 3, H, W] in prompt order, or None. A row ends on a token
    in `stop_ids` (kept as its last id) or after `config.max_new_tokens` ids. Stop strings need text:
    use `Engine`.
    """
    config = config or GenerationConfig()
    images = list(images) if images is not None else [None] * len(prompts)
    # the vision tower once per distinct tensor: RL rollouts pass each prompt's images once per completion
    encoded = {id(px): image_features(model, px) for px in images if px is not None and len(px)}
    features = [None if px is None or len(px) == 0 else encoded[id(px)] for px in images]
    stream = TokenStream(model, prompts, features, config, prefill_chunk=prefill_chunk, fast=fast)
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream:
        for row, token in enumerate(tokens):
            if not stream.done[row]:
                out[row].append(token)
                if token in stops:
                    stream.done[row] = True
    return out
