"""Batches for training: token ids, labels and pixel values from `Example`s.

`LMCollator` builds what MedGemma trains on, right padded:

- `mode="chat"` (sft, rl prompts): the chat template, `<bos><start_of_turn>user\\n` + images + prompt +
  `<end_of_turn>\\n<start_of_turn>model\\n` + answer + `<end_of_turn>\\n`, each image expanded to
  `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`. Labels are the answer tokens and the
  closing `<end_of_turn>` (so the model learns to stop); -100 on the prompt, the image soft tokens,
  `<start_of_image>` / `<end_of_image>`, the final newline and the padding.
  A conversation (`Example.followups`) repeats this per turn; every answer is labelled.
- `mode="plain"` (pretrain): `<bos>` + images + text + `<eos>`, loss on the text and `<eos>`.

Sequences longer than `max_length` are cut at the right; a cut never splits an image (the image is dropped).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from openmedgemma.errors import DataError
from openmedgemma.tokenizer.siglip import canonicalize
from openmedgemma.train.data import Example

IGNORE = -100


class ImageCache:
    """Preprocessed images ([3, S, S] float tensors) of files, by (file, size), within `max_mb` megabytes;
    the least recently used are dropped first. Arrays (e.g. PneumoniaMNIST) are cheap and never cached."""

    def __init__(self, max_mb: int = 1024):
        self.max_bytes = max_mb * 2**20
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()

    def pixel_values(self, images: list, size: int) -> torch.Tensor:
        from openmedgemma.imaging import load_image, to_pixel_values

        out = []
        for image in images:
            key = (image, size) if isinstance(image, str) else None
            if key is not None and key in self._items:
                self._items.move_to_end(key)
                out.append(self._items[key])
                continue
            if isinstance(image, str):
                try:
                    value = to_pixel_values([load_image(image)], size)[0]
                except OSError as err:
                    raise DataError(f"{image}: cannot read the image: {err}") from None
            else:
                value = to_pixel_values([np.asarray(image)], size)[0]
            nbytes = value.numel() * value.element_size()
            if key is not None and nbytes <= self.max_bytes:
                self._items[key] = value
                self.bytes += nbytes
                while self.bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
            out.append(value)
        return torch.stack(out)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list


class LMCollator:
    """Examples -> {input_ids, attention_mask, labels [B, T], pixel_values [N, 3, S, S] | None, n_tokens}."""

    def __init__(self, tokenizer, *, mode: str = "chat", image_seq_length: int = 256, image_size: int = 896,
                 max_length: int = 1024, multimodal: bool = True, cache: ImageCache | None = None):
        if mode not in ("chat", "plain"):
            raise ValueError(f"mode must be 'chat' or 'plain', got {mode!r}")
        self.tok = tokenizer
        self.mode = mode
        self.image_seq_length = image_seq_length
        self.image_size = image_size
        self.max_length = max_length
        self.multimodal = multimodal
        self.cache = cache if cache is not None else ImageCache(0)
        from openmedgemma.tokenizer import image_sequence

        self._image_ids = tokenizer.encode(image_sequence(image_seq_length))
        self._newline = tokenizer.encode("\n")

    # ------------------------------------------------------------------ one example

    def user_message(self, ex: Example) -> dict:
        content = [{"type": "image"} for _ in ex.images]
        if ex.prompt.strip():
            content.append({"type": "text", "text": ex.prompt})
        if not content:
            raise DataError(f"{ex.source}: an example for chat training needs a prompt or an image")
        return {"role": "user", "content": content}

    def prompt_ids(self, ex: Example) -> list[int]:
        """The chat prompt up to and including `<start_of_turn>model\\n` (what generation starts from)."""
        self._check_images(ex)
        return self.tok.encode_chat([self.user_message(ex)], add_generation_prompt=True,
                                    image_seq_length=self.image_seq_length)  # fmt: skip

    def encode(self, ex: Example) -> Encoded:
        self._check_images(ex)
        if self.mode == "chat":
            ids, labels, messages = [], [], [self.user_message(ex)]
            for question, answer in ((ex.prompt, ex.answer), *ex.followups):
                if len(messages) > 1:
                    messages.append({"role": "user", "content": question})
                # each turn's prompt is exactly what chat generation starts from after the earlier turns
                prompt = self.tok.encode_chat(messages, image_seq_length=self.image_seq_length)  # + generation prompt
                if prompt[: len(ids)] != ids:
                    raise DataError(f"{ex.source}: the tokenizer merges text across a turn boundary of this conversation")
                answer_ids = self.tok.encode(answer.strip()) + [self.tok.end_of_turn_id]
                labels += [IGNORE] * (len(prompt) - len(ids)) + answer_ids + [IGNORE] * len(self._newline)
                ids = prompt + answer_ids + self._newline
                messages.append({"role": "assistant", "content": answer})
        else:
            ids = [self.tok.bos_id] + self._image_ids * len(ex.images)
            if ex.prompt.strip():
                ids += self.tok.encode(ex.prompt.strip() + "\n")
            text = self.tok.encode(ex.answer.strip()) + [self.tok.eos_id]
            labels = [IGNORE] * len(ids) + text
            ids = ids + text
        return self._truncate(Encoded(ids, labels, list(ex.images)))

    def _check_images(self, ex: Example) -> None:
        if ex.images and not self.multimodal:
            raise DataError(f"{ex.source}: the example has images but the model is text-only")

    def _truncate(self, enc: Encoded) -> Encoded:
        if len(enc.input_ids) <= self.max_length:
            return enc
        cut = self.max_length
        ids = enc.input_ids
        boi, eoi = self.tok.boi_id, self.tok.eoi_id
        starts = [i for i, t in enumerate(ids) if t == boi]
        ends = [i for i, t in enumerate(ids) if t == eoi]
        kept = 0
        for s, e in zip(starts, ends):
            if e < cut:
                kept += 1
            elif s < cut:  # the cut falls inside this image: cut before it
                cut = s
        return Encoded(ids[:cut], enc.labels[:cut], enc.images[:kept])

    # ------------------------------------------------------------------ batch

    def __call__(self, examples: list[Example]) -> dict:
        return self.pad([self.encode(ex) for ex in examples])

    def pad(self, encoded: list[Encoded]) -> dict:
        if not encoded:
            raise ValueError("empty batch")
        t = max(len(e.input_ids) for e in encoded)
        b = len(encoded)
        input_ids = torch.full((b, t), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            attention_mask[i, :n] = 1
        images = [img for e in encoded for img in e.images]
        pixel_values = self.cache.pixel_values(images, self.image_size) if images else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values, "n_tokens": int(attention_mask.sum())}  # fmt: skip


class SiglipCollator:
    """Image-text pairs -> {input_ids [B, text_length], pixel_values}. `tokenizer` is a `SiglipTextTokenizer`:
    canonicalised, `</s>`-terminated and padded to the text tower's length, exactly as at inference."""

    def __init__(self, tokenizer, *, image_size: int, cache: ImageCache | None = None):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.cache = cache if cache is not None else ImageCache(0)

    def __call__(self, examples: list[Example]) -> dict:
        bad = next((ex for ex in examples if len(ex.images) != 1), None)
        if bad is not None:
            raise DataError(f"{bad.source}: a SigLIP pair needs exactly one image, got {len(bad.images)}")
        ids = self.tokenizer([ex.answer.strip() for ex in examples])
        pixel_values = self.cache.pixel_values([ex.images[0] for ex in examples], self.image_size)
        # pairs of one group are positives for each other: the same caption, or a class's captions (meta)
        keys = [str(ex.meta.get("caption_group", "text:" + canonicalize(ex.answer))) for ex in examples]
        groups = torch.tensor([zlib.crc32(k.encode("utf-8")) for k in keys], dtype=torch.long)
        return {"input_ids": ids, "pixel_values": pixel_values, "groups": groups, "n_tokens": int(ids.numel())}
