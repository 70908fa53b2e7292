"""Special tokens are found by their text: at the official ids in the official layout, elsewhere in a compact one."""

from __future__ import annotations

import json

from openmedgemma.tokenizer import SPECIAL_TOKENS, render_chat

OFFICIAL_IDS = {
    "pad": 0,
    "eos": 1,
    "bos": 2,
    "thought_start": 100,  # <unused94>
    "thought_end": 101,  # <unused95>
    "start_of_turn": 105,
    "end_of_turn": 106,
    "boi": 255999,
    "eoi": 256000,
    "image_token": 262144,
}


def test_official_layout_ids(official, hf_official):
    assert {name: getattr(official, f"{name}_id") for name in OFFICIAL_IDS} == OFFICIAL_IDS
    assert official.stop_ids == (1, 106)
    assert len(official) == 262145 == len(hf_official)
    for name, token_id in OFFICIAL_IDS.items():
        assert hf_official.convert_tokens_to_ids(SPECIAL_TOKENS[name]) == token_id
    assert hf_official.image_token_id == 262144 and hf_official.boi_token_id == 255999


def test_official_layout_reserved_tokens(official):
    # <unusedN> continue after the image markers: <unused99> at 256001 .. <unused6241> at 262143.
    assert official.id_to_token(6) == "<unused0>"
    assert official.id_to_token(104) == "<unused98>"
    assert official.id_to_token(256001) == "<unused99>"
    assert official.id_to_token(262143) == "<unused6241>"
    assert official.id_to_token(107) == "\n" and official.id_to_token(108) == "\n\n"
    assert official.encode("\n\n") == [108]


def test_compact_layout_special_ids_differ_but_chat_works(compact, official):
    ids = {name: getattr(compact, f"{name}_id") for name in OFFICIAL_IDS}
    assert ids["pad"] == 0 and ids["eos"] == 1 and ids["bos"] == 2
    assert ids != OFFICIAL_IDS and len(set(ids.values())) == len(ids)
    assert max(ids.values()) < 20 and len(compact) == 400
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Findings?"}]}]
    ids_compact = compact.encode_chat(messages, image_seq_length=4)
    assert ids_compact[:2] == [compact.bos_id, compact.start_of_turn_id]
    prompt = compact.encode("<start_of_turn>model\n")
    assert ids_compact[-len(prompt):] == prompt
    assert ids_compact.count(compact.image_token_id) == 4
    assert compact.decode(ids_compact, skip_special_tokens=False) == render_chat(messages).replace(
        "<start_of_image>", "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"
    )
    assert compact.stop_ids == (compact.eos_id, compact.end_of_turn_id)


def test_special_flags_in_the_written_files(official_dir):
    added = {t["content"]: t for t in json.loads((official_dir / "tokenizer.json").read_text())["added_tokens"]}
    for token in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<image_soft_token>"):
        assert added[token]["special"] is True and added[token]["normalized"] is False
    for token in ("<unused94>", "<unused95>", "<unused0>", "\n\n"):
        assert added[token]["special"] is False
    config = json.loads((official_dir / "tokenizer_config.json").read_text())
    assert config["processor_class"] == "Gemma3Processor"
    assert config["extra_special_tokens"]["image_token"] == "<image_soft_token>"
    assert config["added_tokens_decoder"]["262144"]["content"] == "<image_soft_token>"
