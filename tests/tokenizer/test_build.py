"""build_tokenizer: the layouts it promises, and arguments it refuses."""

from __future__ import annotations

import pytest

from openmedgemma.tokenizer import Tokenizer, build_tokenizer, compact_layout, official_layout


def test_official_layout_table():
    layout = official_layout()
    assert (layout[0], layout[1], layout[2], layout[3]) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert [layout[i] for i in (100, 101, 105, 106)] == ["<unused94>", "<unused95>", "<start_of_turn>", "<end_of_turn>"]
    assert [layout[i] for i in (255999, 256000, 262144)] == ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    assert len(set(layout.values())) == len(layout)


def test_official_folder_has_every_id_once(official):
    vocab = official.backend.get_vocab()
    assert sorted(vocab.values()) == list(range(262145))
    assert official.backend.get_vocab_size(with_added_tokens=False) == 262144  # the image token is added after


def test_fillers_are_unreachable(official):
    assert official.id_to_token(200000) == "<filler200000>"
    assert 200000 not in official.encode("<filler200000>")


def test_compact_size_and_order(compact_dir, corpus, tmp_path):
    tok = Tokenizer.from_pretrained(compact_dir)
    assert len(tok) == 400
    assert [tok.id_to_token(i) for i in sorted(compact_layout())] == list(compact_layout().values())
    # The same texts and size give the same file.
    again = build_tokenizer(tmp_path, "compact", corpus, vocab_size=400)
    assert (again / "tokenizer.json").read_bytes() == (compact_dir / "tokenizer.json").read_bytes()


def test_compact_learns_pieces(compact):
    ids = compact.encode("The chest X-ray shows a small left pleural effusion.")
    assert len(ids) < 0.7 * 52  # merges learned from the corpus, not one id per character


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "compact", "texts": []}, "trains its pieces on `texts`"),
        ({"layout": "compact", "texts": ["a b"], "vocab_size": 100}, "compact vocab_size must be an int >= 273"),
        ({"layout": "official", "vocab_size": 1000}, "the official layout has 262145 ids"),
        ({"layout": "bpe"}, "layout must be 'official' or 'compact'"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_tokenizer(tmp_path, **kwargs)


def test_a_folder_saved_by_transformers_loads_the_same(compact, hf_compact, tmp_path):
    hf_compact.save_pretrained(tmp_path)
    resaved = Tokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a café 肺?"}]}]
    assert resaved.encode_chat(messages, image_seq_length=3) == compact.encode_chat(messages, image_seq_length=3)
    assert [getattr(resaved, f"{n}_id") for n in ("boi", "image_token", "thought_end")] == [
        getattr(compact, f"{n}_id") for n in ("boi", "image_token", "thought_end")
    ]
