"""Decoding: round trips, parity with transformers, the streaming decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

TEXTS = [
    "The chest X-ray shows a small left pleural effusion.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nafter three newlines\ttab",
    "café au lait, naïve, résumé",  # "é", "ï": byte fallback (not in the training corpus)
    "肺炎 (pneumonia) 肺",  # 3-byte characters
    "emoji 🫁🩻 and flags 🇫🇷, ZWJ 👩‍⚕️",  # 4-byte characters and joiners
    "",
]


@pytest.mark.parametrize("which", ["official", "compact"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(which, text, request):
    tok = request.getfixturevalue(which)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == text
    assert tok.decode(tok.encode(text, add_bos=True), skip_special_tokens=False) == "<bos>" + text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(text, official, hf_official):
    assert official.encode(text) == hf_official.encode(text, add_special_tokens=False)
    assert official.encode(text, add_bos=True) == hf_official.encode(text)
    ids = official.encode_chat([{"role": "user", "content": text or "x"}]) + official.encode(text) + [106, 1]
    for skip in (True, False):
        assert official.decode(ids, skip_special_tokens=skip) == hf_official.decode(ids, skip_special_tokens=skip)


def test_byte_fallback_is_used(official):
    ids = official.encode("肺")
    assert [official.id_to_token(i) for i in ids] == ["<0xE8>", "<0x82>", "<0xBA>"]


def test_decode_rejects_ids_out_of_range(official):
    from openmedgemma.errors import TokenizerError

    with pytest.raises(TokenizerError, match=r"out of range \[0, 262145\): \[262145\]"):
        official.decode([2, 262145])
    with pytest.raises(TokenizerError, match="out of range"):
        official.incremental_decoder().push(-1)


def stream(tok, ids, skip_special_tokens=True):
    decoder = tok.incremental_decoder(skip_special_tokens)
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("which", ["official", "compact"])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_streaming_equals_full_decode(which, text, skip, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_bos=True) + [tok.end_of_turn_id]
    deltas, rest = stream(tok, ids, skip)
    assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas + [rest])  # no character was ever split
    # Only a byte run at the very end waits for flush (end_of_turn, when skipped, does not close it).
    ends_in_bytes = tok.id_to_token(ids[-2]).startswith("<0x")
    assert (rest != "") == (skip and ends_in_bytes)


def test_streaming_holds_a_byte_run_until_it_is_complete(official):
    ids = official.encode("a肺") + official.encode(" b")
    decoder = official.incremental_decoder()
    deltas = [decoder.push(i) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:4] == ["", "", ""]  # <0xE8> <0x82> <0xBA>: held
    assert "".join(deltas[4:]) == "肺 b"  # released with the next ordinary token
    assert decoder.flush() == ""
    assert decoder.text == "a肺 b"


def test_streaming_invalid_bytes_equal_full_decode(official):
    byte = {b: official.token_to_id(f"<0x{b:02X}>") for b in (0x41, 0xE8, 0x82)}
    for ids in (
        [byte[0x41], byte[0xE8], official.encode("x")[0]],  # a run cut short, then text
        [byte[0xE8], byte[0x82]],  # cut short at the end: only flush gives it
        [byte[0x82], byte[0x41]],  # a stray continuation byte
        [byte[0xE8], official.eos_id, byte[0x82], official.token_to_id("<0xBA>")],  # a skipped token inside
    ):
        for skip in (True, False):
            deltas, rest = stream(official, ids, skip)
            assert "".join(deltas) + rest == official.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="▁"), max_size=40))
def test_streaming_and_round_trip_any_text(compact, text):
    ids = compact.encode(text)
    assert compact.decode(ids) == text
    deltas, rest = stream(compact, ids)
    assert "".join(deltas) + rest == text
