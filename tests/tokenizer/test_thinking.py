"""split_thinking on text, decode_thinking on ids."""

from __future__ import annotations

import json

import pytest

from openmedgemma.tokenizer import Tokenizer, split_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The lungs are clear.", (None, "The lungs are clear.")),
        ("  kept as is \n", (None, "  kept as is \n")),
        ("<unused94>thought\nRule out effusion.\nIt is clear.<unused95>Final Answer: (B)",
         ("Rule out effusion.\nIt is clear.", "Final Answer: (B)")),
        ("<unused94>thought\nStep 1.<unused95>\n\nNo effusion.\n", ("Step 1.", "No effusion.")),
        ("<unused94>thought\nStill thinking when the budget ran ou", ("Still thinking when the budget ran ou", "")),
        ("<unused94>", ("", "")),
        ("<unused94>thoughtful reading of the film<unused95>ok", ("thoughtful reading of the film", "ok")),
        ("opened in the prompt<unused95>Answer", ("opened in the prompt", "Answer")),
        ("<unused94>thought\nA<unused95>Answer<end_of_turn>", ("A", "Answer")),
        ("Answer<end_of_turn>\n<eos>", (None, "Answer")),
    ],
)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


GENERATION = "<unused94>thought\nThe patient is 54 years old; consider pneumonia.<unused95>Final Answer: (B)"


@pytest.mark.parametrize("skip", [True, False])
def test_thinking_from_decoded_ids(official, skip):
    ids = official.encode(GENERATION) + [official.end_of_turn_id]
    assert ids[0] == official.thought_start_id == 100
    expected = ("The patient is 54 years old; consider pneumonia.", "Final Answer: (B)")
    # <unused94>/<unused95> are not special tokens: they survive skipping, so the text can be split...
    assert split_thinking(official.decode(ids, skip_special_tokens=skip)) == expected
    # ...and the id-based helper gives the same.
    assert official.decode_thinking(ids) == expected


def test_thinking_cut_off_and_absent(official):
    cut = official.encode("<unused94>thought\nThe patient is 54")
    assert official.decode_thinking(cut) == ("The patient is 54", "")
    plain = official.encode("Final Answer: (B)") + [official.eos_id]
    assert official.decode_thinking(plain) == (None, "Final Answer: (B)")


def test_decode_thinking_works_when_the_markers_are_special(compact_dir, tmp_path):
    # A tokenizer file that marks the markers special: decoding with skipping loses them from the text,
    # the id-based split still finds them.
    document = json.loads((compact_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for token in document["added_tokens"]:
        if token["content"] in ("<unused94>", "<unused95>"):
            token["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    ids = tok.encode(GENERATION)
    assert "<unused95>" not in tok.decode(ids)
    assert tok.decode_thinking(ids) == ("The patient is 54 years old; consider pneumonia.", "Final Answer: (B)")
