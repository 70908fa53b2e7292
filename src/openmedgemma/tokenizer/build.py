"""Make Gemma-style tokenizer folders: for tests (the official id layout) and for small models (compact).

The pipeline mirrors the official Gemma 3 `tokenizer.json` (SentencePiece BPE converted by transformers'
`GemmaConverter`): BPE with byte fallback over `<0x00>`..`<0xFF>`, unk `<unk>`; normalizer `Replace(" ", "▁")`
(no prefix space); pre-tokenizer `Split(" ", merged_with_previous)`; decoder `Replace("▁", " ")`,
`ByteFallback`, `Fuse`; post-processor `<bos> $A`. All the fixed tokens below are added tokens
(normalized false). The control tokens, the turn markers and the image tokens are special; the reserved
`<unusedN>`, `<mask>`, `[multimodal]` and the newline runs are not (the converter makes SentencePiece
user-defined symbols non-special), so `<unused94>` / `<unused95>` survive `skip_special_tokens=True`.

Layouts:
- "official": every special token at its official id, 262145 ids in all (`<image_soft_token>` is 262144,
  one past the 262144-entry text vocabulary). The ordinary pieces (bytes, and a BPE trained on `texts`)
  start at 138; the ids the official vocabulary gives to its other 255k pieces hold unreachable
  `<fillerN>` entries.
- "compact": the special tokens first (pad 0, eos 1, bos 2, as official), then bytes, then a BPE trained on
  `texts`, filled up to exactly `vocab_size` ids.

Next to `tokenizer.json` it writes `tokenizer_config.json` (the official chat template, the image tokens,
`"processor_class": "Gemma3Processor"`) and `special_tokens_map.json`, so transformers' `AutoTokenizer`
and `Gemma3Processor` load the folder too.

`build_siglip_tokenizer` makes MedSigLIP's text tokenizer folder (a trained `spiece.model`, which
`siglip.SiglipTextTokenizer` reads).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from openmedgemma.errors import TokenizerError
from openmedgemma.tokenizer.chat import CHAT_TEMPLATE, END_OF_IMAGE, IMAGE_TOKEN, START_OF_IMAGE
from openmedgemma.tokenizer.siglip import DEFAULT_MAX_LENGTH, canonicalize

OFFICIAL_TEXT_VOCAB = 262144  # ids 0..262143; <image_soft_token> is added after them
OFFICIAL_BPE_PIECES = 4096  # at most this many trained pieces in the official layout
NEWLINE_RUNS = 31  # "\n" .. "\n" * 31 are single tokens in Gemma 3 (ids 107..137)

_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3 in both layouts
_TURNS = ["<start_of_turn>", "<end_of_turn>"]
_SPECIAL = set(_CONTROL + _TURNS + [START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN])  # special added tokens


def official_layout() -> dict[int, str]:
    """The fixed tokens of the official Gemma 3 vocabulary, by id (the ordinary pieces left out)."""
    tokens = _CONTROL + ["<mask>", "[multimodal]"] + [f"<unused{n}>" for n in range(99)] + _TURNS
    tokens += ["\n" * n for n in range(1, NEWLINE_RUNS + 1)]
    layout = dict(enumerate(tokens))  # 0..137: <unused94> is 100, <unused95> is 101
    layout[255999] = START_OF_IMAGE
    layout[256000] = END_OF_IMAGE
    layout.update({256001 + n - 99: f"<unused{n}>" for n in range(99, 6242)})  # 256001..262143
    layout[OFFICIAL_TEXT_VOCAB] = IMAGE_TOKEN
    return layout


def compact_layout() -> dict[int, str]:
    """The fixed tokens of a compact vocabulary: the ones MedGemma's code uses, first."""
    tokens = _CONTROL + ["<mask>"] + _TURNS + [START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN, "<unused94>", "<unused95>"]
    return dict(enumerate(tokens + ["\n" * n for n in range(1, 5)]))


def build_tokenizer(
    out_dir: str | os.PathLike,
    layout: str = "official",
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a Gemma-style tokenizer folder to `out_dir` (created if needed) and return its path.

    `layout="official"`: the official ids, 262145 in all; `texts` (optional) train up to 4096 ordinary
    pieces. `layout="compact"`: `vocab_size` ids in all, the ordinary pieces trained on `texts` (required).
    """
    texts = list(texts or [])
    if layout == "official":
        if vocab_size not in (None, OFFICIAL_TEXT_VOCAB + 1):
            raise ValueError(f"the official layout has {OFFICIAL_TEXT_VOCAB + 1} ids; got vocab_size={vocab_size}")
        fixed, size, budget = official_layout(), OFFICIAL_TEXT_VOCAB + 1, OFFICIAL_BPE_PIECES
    elif layout == "compact":
        if not texts:
            raise ValueError("the compact layout trains its pieces on `texts`; none were given")
        fixed, size = compact_layout(), vocab_size
        if not isinstance(size, int) or size < len(fixed) + 257:
            raise ValueError(f"compact vocab_size must be an int >= {len(fixed) + 257} "
                             f"(special tokens, 256 bytes, '▁'), got {vocab_size!r}")
        budget = size - len(fixed) - 257
    else:
        raise ValueError(f"layout must be 'official' or 'compact', got {layout!r}")

    ordinary = [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    merges: list[tuple[str, str]] = []
    if texts and budget > 0:
        pieces, merges = _train_bpe(texts, budget)
        taken = set(ordinary) | set(fixed.values())
        ordinary += [p for p in pieces if p not in taken]
    free = [i for i in range(size) if i not in fixed]
    if len(ordinary) > len(free):
        raise ValueError(f"{len(ordinary)} ordinary pieces do not fit in {len(free)} free ids; raise vocab_size "
                         "or give texts with fewer distinct characters")
    vocab = {token: i for i, token in fixed.items()}
    vocab.update({token: i for i, token in zip(free, ordinary)})
    vocab.update({f"<filler{i}>": i for i in free[len(ordinary):]})
    text_vocab = {t: i for t, i in vocab.items() if not (layout == "official" and i >= OFFICIAL_TEXT_VOCAB)}

    backend = Backend(BPE(vocab=text_vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    added = [AddedToken(token, normalized=False, special=token in _SPECIAL) for _, token in sorted(fixed.items())]
    backend.add_tokens(added)
    for i, token in fixed.items():
        if backend.token_to_id(token) != i:
            raise RuntimeError(f"internal error: {token!r} landed at id {backend.token_to_id(token)}, not {i}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"), pretty=False)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(fixed))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    return out


def build_siglip_tokenizer(out_dir, texts, vocab_size: int, max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """Train a SigLIP-layout `spiece.model` (unigram; pad 0 `<pad>`, eos 1 `</s>`, unk 2 `<unk>`, no bos) of
    exactly `vocab_size` pieces on the canonicalised `texts`, and write it to `out_dir` with the
    tokenizer_config.json transformers' `SiglipTokenizer` writes (pad with `</s>`, as SigLIP does).
    Deterministic: the same texts give the same file."""
    import sentencepiece

    sentences = sorted({canonicalize(t) for t in texts} - {""})
    if not sentences:
        raise TokenizerError("build_siglip_tokenizer: no texts to train on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, num_threads=1, minloglevel=2,
        )  # fmt: skip
    except RuntimeError as err:  # e.g. too little text for vocab_size pieces
        raise TokenizerError(f"build_siglip_tokenizer: sentencepiece could not train {vocab_size} pieces ({err})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {"1": {"content": "</s>", **special}, "2": {"content": "<unk>", **special}},
        "do_lower_case": True, "eos_token": "</s>", "model_max_length": max_length, "pad_token": "</s>",
        "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>",
    }  # fmt: skip
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    return out


def _train_bpe(texts: list[str], budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Pieces (alphabet first, then merges in order) and merges of a BPE trained on `texts` split the way
    Gemma's SentencePiece splits: at whitespace ("▁" starts a word), newlines, punctuation and digits."""
    trainer_backend = Backend(BPE())
    trainer_backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n+"), "removed"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Punctuation("isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = BpeTrainer(vocab_size=budget, limit_alphabet=budget, show_progress=False)
    trainer_backend.train_from_iterator(texts, trainer)
    model = json.loads(trainer_backend.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges


def _tokenizer_config(fixed: dict[int, str]) -> dict:
    """tokenizer_config.json as the official Gemma 3 checkpoints have it (added tokens listed in full)."""
    added = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": token in _SPECIAL}
        for i, token in sorted(fixed.items())
    }
    images = {"boi_token": START_OF_IMAGE, "eoi_token": END_OF_IMAGE, "image_token": IMAGE_TOKEN}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **images,
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": images,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Gemma3Processor",
        "sp_model_kwargs": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict:
    return {
        "boi_token": START_OF_IMAGE,
        "bos_token": "<bos>",
        "eoi_token": END_OF_IMAGE,
        "eos_token": "<eos>",
        "image_token": IMAGE_TOKEN,
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
