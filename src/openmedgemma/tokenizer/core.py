"""The MedGemma tokenizer: a `tokenizer.json` (Hugging Face `tokenizers`) plus the Gemma special tokens.

The special tokens are looked up by their text, never assumed at fixed ids, so a small custom vocabulary
that carries them (at other ids) works the same as the official 262k one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as Backend

from openmedgemma.errors import TokenizerError
from openmedgemma.tokenizer.chat import (
    IMAGE_SEQ_LENGTH,
    START_OF_IMAGE,
    Messages,
    count_images,
    expand_images,
    render_chat,
)
from openmedgemma.tokenizer.thinking import THOUGHT_END, THOUGHT_START, split_thinking

# attribute -> token text. The official Gemma 3 ids: pad 0, eos 1, bos 2, start_of_turn 105,
# end_of_turn 106, thought_start 100, thought_end 101, boi 255999, eoi 256000, image 262144.
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
    "boi": "<start_of_image>",
    "eoi": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "thought_start": THOUGHT_START,
    "thought_end": THOUGHT_END,
}


class Tokenizer:
    """Encode, decode and chat-format text for MedGemma.

    Attributes: `pad_id`, `eos_id`, `bos_id`, `start_of_turn_id`, `end_of_turn_id`, `boi_id`, `eoi_id`,
    `image_token_id`, `thought_start_id` (`<unused94>`), `thought_end_id` (`<unused95>`), `stop_ids`
    (eos and end_of_turn: generation stops on either), `special_ids` (the ids `skip_special_tokens` drops),
    `vocab_size` (all ids, added tokens included), `backend` (the `tokenizers.Tokenizer`) and `source`
    (the file it came from).
    """

    pad_id: int
    eos_id: int
    bos_id: int
    start_of_turn_id: int
    end_of_turn_id: int
    boi_id: int
    eoi_id: int
    image_token_id: int
    thought_start_id: int
    thought_end_id: int

    def __init__(self, backend: Backend, source: str = "<in memory>"):
        self.backend = backend
        self.source = source
        missing, split = [], []
        for name, text in SPECIAL_TOKENS.items():
            token_id = backend.token_to_id(text)
            if token_id is None:
                missing.append(text)
            elif backend.encode(text, add_special_tokens=False).ids != [token_id]:
                split.append(text)
            setattr(self, f"{name}_id", token_id)
        if missing:
            raise TokenizerError(
                f"{source}: missing required special tokens: {', '.join(missing)} "
                f"(a MedGemma tokenizer must carry all of {', '.join(SPECIAL_TOKENS.values())})"
            )
        if split:
            raise TokenizerError(
                f"{source}: special tokens not matched as single tokens in text: {', '.join(split)} "
                "(they must be added tokens in tokenizer.json, with normalized false)"
            )
        self.stop_ids = (self.eos_id, self.end_of_turn_id)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids = frozenset(i for i in byte_ids if i is not None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `path`: a checkpoint folder holding `tokenizer.json`, or the file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            where = f"{path} has no tokenizer.json" if path.is_dir() else f"{file}: no such file"
            raise TokenizerError(f"{where} (a MedGemma checkpoint folder carries its tokenizer.json)")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{file}: cannot read the tokenizer file ({err})") from err
        try:
            backend = Backend.from_str(text)
        except Exception as err:  # tokenizers raises a plain Exception for bad JSON and bad fields alike
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({err})") from err
        return cls(backend, str(file))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ text

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<start_of_turn>`) become their ids.
        Adds `<bos>` in front only when asked."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Skipping special tokens drops those tokenizer.json marks special (bos, eos, turn
        and image markers in the official file); `<unused94>` / `<unused95>` are not special there."""
        ids = self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_thinking(self, ids: Iterable[int]) -> tuple[str | None, str]:
        """(thought, answer) from generated ids (see `split_thinking`), split on the marker ids, so it works
        whether or not the tokenizer file marks `<unused94>` / `<unused95>` as special."""
        ids = self._check_ids(ids)
        markers = {self.thought_start_id: THOUGHT_START, self.thought_end_id: THOUGHT_END}
        pieces, begin = [], 0
        for position, token_id in enumerate(ids):
            if token_id in markers:
                pieces += [self.decode(ids[begin:position]), markers[token_id]]
                begin = position + 1
        pieces.append(self.decode(ids[begin:]))
        return split_thinking("".join(pieces))

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.source}: token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def count_images(self, messages: Messages) -> int:
        return count_images(messages)

    def encode_chat(
        self, messages: Messages, add_generation_prompt: bool = True, image_seq_length: int = IMAGE_SEQ_LENGTH
    ) -> list[int]:
        """Prompt ids for `messages`, as `Gemma3Processor.apply_chat_template(..., tokenize=True)` gives
        them: `<bos>` once (from the template), each image expanded to `image_seq_length` soft tokens."""
        return self.encode(self._chat_text(messages, add_generation_prompt, image_seq_length))

    def encode_chats(
        self,
        conversations: Sequence[Messages],
        add_generation_prompt: bool = True,
        image_seq_length: int = IMAGE_SEQ_LENGTH,
    ) -> list[list[int]]:
        """`encode_chat` for several conversations at once (unpadded, one list per conversation)."""
        texts = [self._chat_text(m, add_generation_prompt, image_seq_length) for m in conversations]
        return self.encode_batch(texts)

    def _chat_text(self, messages: Messages, add_generation_prompt: bool, image_seq_length: int) -> str:
        text = render_chat(messages, add_generation_prompt)
        images = count_images(messages)
        if text.count(START_OF_IMAGE) != images:
            raise TokenizerError(
                f"chat messages: the text contains {START_OF_IMAGE} itself; it marks where an image goes and "
                f"must come only from image items ({images} image items, "
                f"{text.count(START_OF_IMAGE)} markers)"
            )
        return expand_images(text, image_seq_length)


class IncrementalDecoder:
    """Text deltas from ids fed one at a time; the deltas joined equal `tokenizer.decode(all ids)`.

    A run of byte-fallback tokens (`<0xE8><0x82><0xBA>` = "肺") is held back until a token that is not a
    byte closes it (or `flush`), since only the whole run decodes to its characters: so no character is
    ever split, and an invalid byte sequence comes out as the same U+FFFD characters a full decode gives.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # ids[_start:] are not emitted yet; ids[_anchor:_start] were the last emitted window
        self._anchor = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (often "", never part of a character)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.tokenizer.vocab_size:
            raise TokenizerError(f"{self.tokenizer.source}: token id out of range: {token_id}")
        self.ids.append(token_id)
        skipped = self.skip_special_tokens and token_id in self.tokenizer.special_ids
        if skipped or token_id in self.tokenizer._byte_ids:
            return ""
        return self._emit()

    def flush(self) -> str:
        """The text still held back (an unfinished byte run at the end of the ids)."""
        return self._emit() if self._start < len(self.ids) else ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, self.skip_special_tokens)

    def _emit(self) -> str:
        # Decode the previous window with the new one so decoders that treat the first token specially
        # (a Strip of the leading space) see the same context as in a full decode.
        decode = self.tokenizer.backend.decode
        before = decode(self.ids[self._anchor:self._start], skip_special_tokens=self.skip_special_tokens)
        both = decode(self.ids[self._anchor:], skip_special_tokens=self.skip_special_tokens)
        self._anchor, self._start = self._start, len(self.ids)
        return both[len(before):]
