"""render_chat / encode_chat against transformers (5.23) on the same tokenizer folder."""

from __future__ import annotations

import pytest

from openmedgemma.tokenizer import count_images, render_chat

TEXT_CHATS = {
    "plain": [{"role": "user", "content": "What is a pneumothorax?"}],
    "list": [{"role": "user", "content": [{"type": "text", "text": "What is a pneumothorax?"}]}],
    "system": [
        {"role": "system", "content": "You are an expert radiologist."},
        {"role": "user", "content": "Describe the heart size."},
    ],
    "system_list": [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the heart size."}]},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Is there an effusion?"},
        {"role": "assistant", "content": "Yes, a small left pleural effusion."},
        {"role": "user", "content": "And a pneumothorax?"},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {"role": "user", "content": "Thanks. Summarize."},
    ],
    "whitespace": [
        {"role": "system", "content": "  Keep the system spaces.  \n"},
        {"role": "user", "content": "\n\t  lots of   space inside\n and around \n\n"},
        {"role": "assistant", "content": "   answer  "},
        {"role": "user", "content": [{"type": "text", "text": "  first  "}, {"type": "text", "text": "\nsecond\n"}]},
    ],
    "unicode": [{"role": "user", "content": "Le poumon: café, 肺, 🫁 — 54 ans?"}],
    "empty_text": [{"role": "user", "content": "   "}],
}

IMAGE_CHATS = {
    "one_image": lambda img: [
        {"role": "user", "content": [{"type": "image", "image": img(1)}, {"type": "text", "text": "Describe it."}]}
    ],
    "text_then_image": lambda img: [
        {"role": "user", "content": [{"type": "text", "text": "What is shown? "}, {"type": "image", "image": img(1)}]}
    ],
    "two_images_interleaved": lambda img: [
        {"role": "system", "content": "You are an expert radiologist."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare the prior"},
                {"type": "image", "image": img(1)},
                {"type": "text", "text": " with the current study "},
                {"type": "image", "image": img(2)},
                {"type": "text", "text": "  What changed?"},
            ],
        },
    ],
    "image_multi_turn": lambda img: [
        {"role": "user", "content": [{"type": "image", "image": img(1)}, {"type": "text", "text": "Findings?"}]},
        {"role": "assistant", "content": "A small effusion."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": img(2)}]},
    ],
    "two_images_adjacent": lambda img: [
        {"role": "user", "content": [{"type": "image", "image": img(1)}, {"type": "image", "image": img(2)}]}
    ],
}


@pytest.mark.parametrize("name", sorted(TEXT_CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_text_chats_match_transformers(name, add_generation_prompt, official, hf_official):
    messages = TEXT_CHATS[name]
    expected_text = hf_official.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    expected_ids = hf_official.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert render_chat(messages, add_generation_prompt) == expected_text
    assert official.encode_chat(messages, add_generation_prompt) == expected_ids
    assert expected_ids[0] == official.bos_id and expected_ids.count(official.bos_id) == 1


def test_rendering_is_the_documented_format():
    messages = TEXT_CHATS["multi_turn"][:3]
    assert render_chat(messages) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nIs there an effusion?<end_of_turn>\n"
        "<start_of_turn>model\nYes, a small left pleural effusion.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_string_and_list_content_give_the_same_ids(official):
    assert official.encode_chat(TEXT_CHATS["plain"]) == official.encode_chat(TEXT_CHATS["list"])
    assert official.encode_chat(TEXT_CHATS["system"]) == official.encode_chat(TEXT_CHATS["system_list"])


@pytest.mark.parametrize("name", sorted(IMAGE_CHATS))
@pytest.mark.parametrize("image_seq_length", [256, 5])
def test_image_chats_match_gemma3_processor(
    name, image_seq_length, official, hf_official, make_processor, random_image
):
    messages = IMAGE_CHATS[name](random_image)
    processor = make_processor(hf_official, image_seq_length)
    out = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    expected = [int(i) for i in out["input_ids"][0]]
    ours = official.encode_chat(messages, image_seq_length=image_seq_length)
    assert ours == expected
    images = count_images(messages)
    assert images == len(out["pixel_values"])
    assert ours.count(official.image_token_id) == images * image_seq_length
    assert ours.count(official.boi_id) == ours.count(official.eoi_id) == images


def test_image_keys_are_accepted_and_not_read(official):
    # The tokenizer never opens the image: any of the keys transformers reads, or none, gives the same ids.
    items = [
        {"type": "image"},
        {"type": "image", "image": object()},
        {"type": "image", "url": "https://example.org/cxr.png"},
        {"type": "image", "path": "/nonexistent/cxr.png"},
    ]
    results = [official.encode_chat([{"role": "user", "content": [item, {"type": "text", "text": "Hi"}]}])
               for item in items]
    assert all(r == results[0] for r in results)
    assert results[0].count(official.boi_id) == 1


def test_encode_chats_equals_encode_chat_each(official, random_image):
    conversations = [
        TEXT_CHATS["plain"], TEXT_CHATS["multi_turn"], IMAGE_CHATS["two_images_interleaved"](random_image)
    ]
    assert official.encode_chats(conversations, image_seq_length=7) == [
        official.encode_chat(m, image_seq_length=7) for m in conversations
    ]


@pytest.mark.parametrize("name", ["multi_turn", "whitespace", "unicode"])
def test_compact_tokenizer_matches_transformers(name, compact, hf_compact):
    messages = TEXT_CHATS[name]
    expected = hf_compact.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert compact.encode_chat(messages) == expected


def test_compact_tokenizer_images_match_gemma3_processor(compact, hf_compact, make_processor, random_image):
    messages = IMAGE_CHATS["two_images_interleaved"](random_image)
    out = make_processor(hf_compact, 16).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    ours = compact.encode_chat(messages, image_seq_length=16)
    assert ours == [int(i) for i in out["input_ids"][0]]
    assert ours.count(compact.image_token_id) == 32
