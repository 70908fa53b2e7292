"""SiglipTextTokenizer: ids identical to transformers' SiglipTokenizer / SiglipProcessor.

The oracle is transformers' SiglipTokenizer on a SentencePiece unigram model trained here with
SigLIP's special-token ids (T5's layout: <pad> 0, </s> 1, <unk> 2, no <s>) and written to a folder
with `save_pretrained`, as the official checkpoints carry it (spiece.model + tokenizer_config.json,
no tokenizer.json). The official config pads with </s> (= eos), which hides where eos is put; the
same texts are therefore also checked with pad <pad> (id 0), where a misplaced or missing eos shows.
"""

from __future__ import annotations

import io
import json
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openmedgemma.errors import TokenizerError
from openmedgemma.tokenizer import SiglipTextTokenizer

# the oracle warns when a text ends in a literal </s> (it then adds no second one, as we do)
pytestmark = pytest.mark.filterwarnings("ignore:This sequence already has </s>:UserWarning")

WORDS = (
    "the a an of with without no and or is are there chest x-ray xray radiograph image scan ct mri slice "
    "axial lateral frontal view left right lower upper lobe lung lungs heart size normal abnormal small large "
    "pleural effusion pneumothorax pneumonia opacity consolidation atelectasis cardiomegaly edema fracture rib "
    "lesion mass nodule patient shows showing findings impression acute chronic mild moderate severe stable "
    "unchanged compared prior study tube line catheter device skin lesion melanoma nevus retina fundus "
    "pathology tissue tumor cells benign malignant photo of 1 2 3 10 cm mm"
).split()

TEXTS = [
    "a chest x-ray showing pneumonia",
    "No pneumothorax. Heart size is NORMAL!",  # punctuation and capitals
    "  Left   lower\tlobe\n\nconsolidation   ",  # whitespace runs, tabs, newlines
    "Pleural effusion (small), right-sided; stable vs. prior?",
    "Ünïcödé façade — “quoted” ‘text’ 肺 🫁 naïve",  # unicode: unknown pieces, non-ASCII punctuation kept
    "the ▁ underline ▁▁ piece",  # SentencePiece's own space marker in the input
    "literal special tokens </s> and <unk> and <pad> inside",
    "</s>",
    "</s>lobe",
    "</S> upper case special",
    "",
    "   ",
    "?!.,;:",
    " ".join(["moderate right pleural effusion with adjacent atelectasis"] * 12),  # > 64 tokens: truncated
    "melanoma " * 62 + "</s>",  # the 63rd piece is </s>: no second eos
]


def train_spiece(path, seed: int = 0, keep_spaces: bool = False) -> None:
    """A small unigram spiece.model with SigLIP's special-token ids, trained on 400 sentences.

    keep_spaces: a normaliser that keeps extra whitespace (SigLIP's removes it), so that a lone
    "▁" piece can occur and the tokenizer's rule for it is exercised.
    """
    import sentencepiece

    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=300,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, remove_extra_whitespaces=not keep_spaces, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def write_tokenizer_folder(folder, spiece, **kwargs):
    """`folder` as transformers writes a SigLIP tokenizer (spiece.model + tokenizer_config.json)."""
    from transformers import SiglipTokenizer

    SiglipTokenizer(vocab_file=str(spiece), **kwargs).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    train_spiece(path)
    return path


@pytest.fixture(scope="module")
def spiece_keep_spaces(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    train_spiece(path, keep_spaces=True)
    return path


@pytest.fixture(
    scope="module", params=[("</s>", False), ("<pad>", False), ("<pad>", True)], ids=["official", "pad0", "spaces"]
)
def folder(request, spiece, spiece_keep_spaces, tmp_path_factory):
    pad, keep_spaces = request.param
    model = spiece_keep_spaces if keep_spaces else spiece
    return write_tokenizer_folder(tmp_path_factory.mktemp("tok"), model, pad_token=pad)


def oracle(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "SiglipTokenizer"
    return tok


def hf_ids(tok, texts, max_length=64):
    return tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")["input_ids"]


def test_folder_is_the_official_layout(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert "spiece.model" in names and "tokenizer_config.json" in names and "tokenizer.json" not in names


def test_ids_identical_to_transformers(folder):
    ours = SiglipTextTokenizer.from_pretrained(folder)
    ids = ours(TEXTS)
    assert ids.dtype == torch.long and ids.shape == (len(TEXTS), 64)
    torch.testing.assert_close(ids, hf_ids(oracle(folder), TEXTS), rtol=0, atol=0)
    # the texts exercise what they claim to
    assert len(ours.tokenize(TEXTS[-2])) > 64 and ids[-2, -1] == ours.eos_id  # truncated; eos kept last
    assert len(ours.tokenize(TEXTS[-1])) == 63 and ours.tokenize(TEXTS[-1])[-1] == "</s>"
    assert (ids[4] == ours.sp.unk_id()).any() and (ids[6] == ours.special_ids["<unk>"]).any()


def test_processor_gives_the_same_ids(folder):
    from transformers import SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(), tokenizer=oracle(folder))
    expected = processor(text=TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    ours = SiglipTextTokenizer.from_pretrained(folder)(TEXTS)
    torch.testing.assert_close(ours, expected["input_ids"], rtol=0, atol=0)


def test_canonicalisation_lowercases_and_drops_punctuation(folder):
    ours = SiglipTextTokenizer.from_pretrained(folder)
    assert ours.canonicalize("  No   PNEUMOTHORAX.\n(Stable!)  ") == "no pneumothorax stable"
    same = ours(["No pneumothorax, stable!", "no   pneumothorax stable"])
    assert torch.equal(same[0], same[1])


ALPHABET = st.sampled_from(
    list("abcxyz ABC .,;!?-()'\"\t\n") + ["é", "ü", "肺", "—", "“", "▁", "</s>", "<unk>", "<pad>"] + WORDS[:40]
)


@pytest.fixture(scope="module", params=[False, True], ids=["pad0", "spaces"])
def pad0_pair(request, spiece, spiece_keep_spaces, tmp_path_factory):
    model = spiece_keep_spaces if request.param else spiece
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("pad0"), model, pad_token="<pad>")
    return SiglipTextTokenizer.from_pretrained(folder, max_length=24), oracle(folder)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(pieces=st.lists(st.lists(ALPHABET, max_size=40), min_size=1, max_size=4))
def test_random_texts_identical_to_transformers(pad0_pair, pieces):
    ours, tok = pad0_pair
    texts = ["".join(p) for p in pieces]
    torch.testing.assert_close(ours(texts), hf_ids(tok, texts, max_length=24), rtol=0, atol=0)


def test_length_comes_from_the_model_config(spiece, tmp_path):
    from tests import tiny

    folder = write_tokenizer_folder(tmp_path, spiece)
    assert SiglipTextTokenizer.from_pretrained(folder).max_length == 64  # tokenizer_config's model_max_length
    (folder / "config.json").write_text(json.dumps(tiny.siglip_hf_config()))  # max_position_embeddings 16
    ours = SiglipTextTokenizer.from_pretrained(folder)
    assert ours.max_length == 16 and ours(["a b c"]).shape == (1, 16)
    assert SiglipTextTokenizer.from_pretrained(folder, max_length=32)(["a"]).shape == (1, 32)


def test_folder_without_spiece_model(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path}: no spiece.model")):
        SiglipTextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no spiece.model .*only a tokenizer.json"):
        SiglipTextTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no such folder"):
        SiglipTextTokenizer.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", b"\x0a\x05\x0a\x01a"])
def test_corrupt_spiece_model(tmp_path, content):
    (tmp_path / "spiece.model").write_bytes(content)
    with pytest.raises(TokenizerError, match=r"spiece.model: not a valid SentencePiece model"):
        SiglipTextTokenizer.from_pretrained(tmp_path)


def test_special_token_missing_from_the_vocabulary(spiece, tmp_path):
    folder = write_tokenizer_folder(tmp_path, spiece)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "[EOS]"}))
    with pytest.raises(TokenizerError, match=r"spiece.model: the SentencePiece vocabulary has no '\[EOS\]' piece"):
        SiglipTextTokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read"):
        SiglipTextTokenizer.from_pretrained(folder)
