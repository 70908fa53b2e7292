"""Every failure a user can cause is a TokenizerError that names the file (or message) and the problem."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from openmedgemma.errors import TokenizerError
from openmedgemma.tokenizer import SPECIAL_TOKENS, Tokenizer, render_chat


def test_missing_folder_file(tmp_path):
    with pytest.raises(TokenizerError, match=rf"{tmp_path} has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'nope.json'}: no such file"):
        Tokenizer.from_pretrained(tmp_path / "nope.json")


def test_corrupt_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'tokenizer.json'}: not a valid tokenizer.json \(.+\)"):
        Tokenizer.from_pretrained(tmp_path)


def test_not_utf8(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="cannot read the tokenizer file"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.json")


def write_backend(path, specials, in_vocab_only=()):
    vocab = {token: i for i, token in enumerate(["<unk>", "a", "b", *specials, *in_vocab_only])}
    backend = Backend(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(path))


def test_missing_special_tokens_are_all_listed(tmp_path):
    present = [t for t in SPECIAL_TOKENS.values() if t not in ("<start_of_turn>", "<unused95>")]
    write_backend(tmp_path / "tokenizer.json", present)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_pretrained(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'tokenizer.json'}: missing required special tokens: ")
    assert "<start_of_turn>, <unused95> (a MedGemma tokenizer must carry all of" in message


def test_special_token_that_is_not_an_added_token(tmp_path):
    present = [t for t in SPECIAL_TOKENS.values() if t != "<end_of_turn>"]
    write_backend(tmp_path / "tokenizer.json", present, in_vocab_only=["<end_of_turn>"])
    with pytest.raises(TokenizerError, match=r"not matched as single tokens in text: <end_of_turn> \(they must be"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "roles, where",
    [
        (["user", "user"], "chat message 1: role 'user' where 'assistant'"),
        (["assistant"], "chat message 0: role 'assistant' where 'user'"),
        (["system", "assistant"], "chat message 1: role 'assistant' where 'user'"),
        (["user", "assistant", "assistant"], "chat message 2: role 'assistant' where 'user'"),
    ],
)
def test_non_alternating_roles(roles, where, hf_official):
    messages = [{"role": role, "content": f"message {i}"} for i, role in enumerate(roles)]
    with pytest.raises(TokenizerError, match=rf"{where}.*roles must alternate user/assistant"):
        render_chat(messages)
    with pytest.raises(Exception, match="Conversation roles must alternate"):  # the official template agrees
        hf_official.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "chat messages are empty"),
        ("hello", "must be a list"),
        ([{"role": "user"}], "chat message 0: must be a dict with 'role' and 'content'"),
        ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "chat message 1: role 'system'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}], "chat message 1: role 'tool'"),
        ([{"role": "user", "content": None}], "content must be a string or a list of items, got NoneType"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "content items must be"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text item needs a string 'text'"),
        ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "a"}],
         "exactly one text item"),
    ],
)
def test_invalid_chats(messages, message):
    with pytest.raises(TokenizerError, match=message):
        render_chat(messages)


def test_literal_image_marker_in_text(official):
    messages = [{"role": "user", "content": "see <start_of_image> here"}]
    with pytest.raises(TokenizerError, match="contains <start_of_image> itself"):
        official.encode_chat(messages)


def test_bad_image_seq_length(official):
    with pytest.raises(ValueError, match="image_seq_length must be a positive int"):
        official.encode_chat([{"role": "user", "content": [{"type": "image"}]}], image_seq_length=0)


def test_error_is_an_openmedgemma_error(tmp_path):
    from openmedgemma.errors import OpenMedGemmaError

    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}), encoding="utf-8")
    with pytest.raises(OpenMedGemmaError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
