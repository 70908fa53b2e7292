"""MedSigLIP's text tokenizer: SigLIP's SentencePiece model (`spiece.model`), padded to 64 tokens.

Reproduces transformers' `SiglipTokenizer` called with `padding="max_length", truncation=True`:

1. `text.replace("▁", " ")`, prefixed with "▁", is split around the special-token strings
   (`</s>`, `<unk>`, the pad token and any other token listed in tokenizer_config.json);
2. each other piece is canonicalised as big_vision does: lowercased (`do_lower_case`, default
   true), ASCII punctuation (`string.punctuation`) removed, whitespace runs collapsed to one
   space, stripped; then SentencePiece-encoded behind an `<unk>` prefix whose pieces are dropped
   (transformers' trick to control the leading "▁");
3. a leading lone "▁" before a special token is dropped; ids are truncated to max_length - 1 and
   `</s>` is appended unless the ids already end with it;
4. right-padded with the pad token (`</s>`, id 1 in SigLIP's vocabulary: pad 0 is `<pad>`, eos
   1 `</s>`, unk 2 `<unk>`, as T5's) to max_length. The text tower pools the last position, so
   the padding length must be the model's (`text_config.max_position_embeddings`).

SigLIP checkpoints ship only `spiece.model` (no tokenizer.json): the canonicalisation above is not
expressible in a tokenizer.json, which is why transformers has no fast SigLIP tokenizer either.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from openmedgemma.errors import TokenizerError

SPIECE_UNDERLINE = "\u2581"
DEFAULT_MAX_LENGTH = 64
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _token_content(value, default: str) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if value is None:
        return default
    return str(value.get("content", default)) if isinstance(value, dict) else str(value)


class SiglipTextTokenizer:
    """Text -> the [N, max_length] input ids MedSigLIP's text tower takes."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        unk_token: str = "<unk>",
        extra_special_tokens: tuple[str, ...] = (),
        do_lower_case: bool = True,
        source: str = "spiece.model",
    ):
        import sentencepiece

        self.source = source
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as err:
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({err})") from None
        if max_length < 2:
            raise TokenizerError(f"{source}: max_length must be at least 2 (room for </s>), got {max_length}")
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.unk_token = unk_token
        specials = (eos_token, pad_token, unk_token, *extra_special_tokens)
        self.special_ids = {token: self._piece_id(token) for token in specials}
        self.eos_id, self.pad_id = self.special_ids[eos_token], self.special_ids[pad_token]
        self._special_split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.special_ids, key=len, reverse=True)) + ")"
        )
        self._unk_length = len(self.sp.encode(unk_token))

    def _piece_id(self, token: str) -> int:
        piece_id = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(piece_id) != token:
            raise TokenizerError(f"{self.source}: the SentencePiece vocabulary has no {token!r} piece")
        return piece_id

    @classmethod
    def from_pretrained(cls, folder, max_length: int | None = None) -> "SiglipTextTokenizer":
        """Read `spiece.model` (+ tokenizer_config.json when present) from a MedSigLIP folder.

        max_length: None takes the model's `text_config.max_position_embeddings` from config.json,
        else tokenizer_config.json's `model_max_length`, else 64.
        """
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: no such folder")
        file = folder / "spiece.model"
        if not file.is_file():
            also = ""
            if (folder / "tokenizer.json").is_file():
                also = " (only a tokenizer.json, which cannot express SigLIP's text canonicalisation)"
            raise TokenizerError(
                f"{folder}: no spiece.model{also}; a MedSigLIP / SigLIP folder carries its SentencePiece "
                "tokenizer as spiece.model"
            )
        try:
            proto = file.read_bytes()
        except OSError as err:
            raise TokenizerError(f"{file}: cannot read ({err})") from None
        settings = _read_json(folder / "tokenizer_config.json")
        if settings.get("legacy") is False or settings.get("sp_model_kwargs"):
            raise TokenizerError(
                f"{folder / 'tokenizer_config.json'}: legacy=false / sp_model_kwargs are not supported "
                "(SigLIP checkpoints use neither)"
            )
        extra = [_token_content(t, "") for t in (settings.get("added_tokens_decoder") or {}).values()]
        extra += [_token_content(t, "") for t in settings.get("additional_special_tokens") or []]
        return cls(
            proto,
            max_length=max_length or _model_max_length(folder, settings),
            eos_token=_token_content(settings.get("eos_token"), "</s>"),
            pad_token=_token_content(settings.get("pad_token"), "</s>"),
            unk_token=_token_content(settings.get("unk_token"), "<unk>"),
            extra_special_tokens=tuple(t for t in extra if t),
            do_lower_case=bool(settings.get("do_lower_case", True)),
            source=str(file),
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def canonicalize(self, text: str) -> str:
        return canonicalize(text, self.do_lower_case)

    def _encode_chunk(self, chunk: str) -> list[str]:
        pieces = self.sp.encode(self.unk_token + self.canonicalize(chunk), out_type=str)
        return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        """The pieces of one text, before truncation and `</s>`."""
        if not isinstance(text, str):
            raise TokenizerError(f"texts must be strings, got {type(text).__name__}")
        pieces = []
        for chunk in self._special_split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")):
            if chunk in self.special_ids:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._encode_chunk(chunk))
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special_ids:
            pieces = pieces[1:]
        return pieces

    def encode(self, text: str) -> list[int]:
        """Ids of one text: truncated to max_length - 1, then `</s>` (not repeated); no padding."""
        ids = [self.special_ids[p] if p in self.special_ids else self.sp.piece_to_id(p) for p in self.tokenize(text)]
        ids = ids[: self.max_length - 1]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, texts):
        """torch.LongTensor [N, max_length]: each text's ids right-padded with the pad token."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return ids


def canonicalize(text: str, lower: bool = True) -> str:
    """big_vision's canonicalisation: lowercase, no ASCII punctuation, single spaces, stripped."""
    if lower:
        text = text.lower()
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{file}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: must hold a JSON object")
    return data


def _model_max_length(folder: Path, settings: dict) -> int:
    if (folder / "config.json").is_file():
        from openmedgemma.config import MedSigLIPConfig, from_hf_config, read_hf_config

        config = from_hf_config(read_hf_config(folder))
        if isinstance(config, MedSigLIPConfig):
            return config.text.max_position_embeddings
    length = settings.get("model_max_length")
    return length if isinstance(length, int) and 0 < length <= 100_000 else DEFAULT_MAX_LENGTH
