"""The Gemma 3 / MedGemma chat format, in plain Python.

`render_chat` produces exactly the text the official jinja template (`CHAT_TEMPLATE`, as shipped in
google/gemma-3-*-it and google/medgemma-*-it `tokenizer_config.json`) renders:

    <bos><start_of_turn>user\\n{system + "\\n\\n"}{content}<end_of_turn>\\n<start_of_turn>model\\n

What the template does, and so what this does:
- a system message (first message only) is not a turn: its text + "\\n\\n" is put in front of the first
  user turn, as given (not trimmed);
- the other messages alternate user / assistant, starting with user; assistant is rendered as `model`;
- text (a string content, or each text item of a list content) is trimmed (`| trim`, i.e. `str.strip()`);
- an image item becomes `<start_of_image>` with nothing around it;
- the generation prompt is `<start_of_turn>model\\n`.

Where the template would silently render something meaningless, this raises `TokenizerError` instead:
roles other than system (first) / user / assistant (the template renders e.g. a later `system` or a `tool`
message as a `<start_of_turn>system` turn), item types other than text / image (the template drops them),
a system message with images or several items (the template keeps only the first item's text), and a
system message with no user message after it (the template drops the system text).

`expand_images` turns each `<start_of_image>` into the image sequence `Gemma3Processor` puts in its
place: "\\n\\n<start_of_image>" + n x "<image_soft_token>" + "<end_of_image>\\n\\n".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from openmedgemma.errors import TokenizerError

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
IMAGE_SEQ_LENGTH = 256  # soft tokens per image in MedGemma (64x64 patches average-pooled 4x4)

# Keys an image item may carry the image under (what transformers' processors read), in the order the
# engine looks for it; the tokenizer itself never reads the image.
IMAGE_KEYS = ("image", "path", "url")

# The official Gemma 3 chat template (google/gemma-3-4b-it and google/medgemma-4b-it tokenizer_config.json).
# Written into the tokenizer_config.json that `build_tokenizer` makes, so transformers renders with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

Messages = Sequence[Mapping[str, Any]]


def render_chat(messages: Messages, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` (a list of {"role", "content"} dicts), starting with `<bos>`."""
    prefix, first = _system_prefix(messages)
    parts = [BOS]
    for index in range(first, len(messages)):
        message = messages[index]
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TokenizerError(
                f"chat message {index}: role {message['role']!r} where {expected!r} was expected; roles must "
                "alternate user/assistant/user/... after an optional system message first"
            )
        parts.append(f"{START_OF_TURN}{'model' if expected == 'assistant' else 'user'}\n")
        if index == first:
            parts.append(prefix)
        content = message["content"]
        if isinstance(content, str):
            parts.append(content.strip())
        else:
            parts.extend(START_OF_IMAGE if item["type"] == "image" else item["text"].strip()
                         for item in _items(content, index))
        parts.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def count_images(messages: Messages) -> int:
    """How many image items `messages` holds (each becomes one `<start_of_image>`)."""
    _, first = _system_prefix(messages)
    return sum(
        item["type"] == "image"
        for index in range(first, len(messages))
        if not isinstance(messages[index]["content"], str)
        for item in _items(messages[index]["content"], index)
    )


def image_sequence(image_seq_length: int = IMAGE_SEQ_LENGTH) -> str:
    """What `Gemma3Processor` puts in place of each `<start_of_image>` (no pan-and-scan crops)."""
    if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
        raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
    return f"\n\n{START_OF_IMAGE}{IMAGE_TOKEN * image_seq_length}{END_OF_IMAGE}\n\n"


def expand_images(text: str, image_seq_length: int = IMAGE_SEQ_LENGTH) -> str:
    """`text` with each `<start_of_image>` replaced by the full image sequence."""
    return text.replace(START_OF_IMAGE, image_sequence(image_seq_length))


def _system_prefix(messages: Messages) -> tuple[str, int]:
    """(the text to put before the first user content, the index of the first turn message)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise TokenizerError("chat messages are empty: at least one user message is needed")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(f"chat message {index}: must be a dict with 'role' and 'content', got {message!r:.80}")
    if messages[0]["role"] != "system":
        return "", 0
    if len(messages) == 1:
        raise TokenizerError("chat messages: a system message must be followed by a user message")
    content = messages[0]["content"]
    if isinstance(content, str):
        return content + "\n\n", 1
    items = _items(content, 0)
    if len(items) != 1 or items[0]["type"] != "text":
        raise TokenizerError(
            "chat message 0 (system): content must be a string or a list of exactly one text item "
            "(the Gemma 3 template keeps only the first item's text)"
        )
    return items[0]["text"] + "\n\n", 1


def _items(content: Any, index: int) -> list[Mapping[str, Any]]:
    """The items of a list content, checked: text items carry a string `text`; image items are accepted
    with the image under one of IMAGE_KEYS, or with no image at all (passed to the processor separately)."""
    if isinstance(content, (str, bytes, Mapping)) or not isinstance(content, Sequence):
        raise TokenizerError(
            f"chat message {index}: content must be a string or a list of items, got {type(content).__name__}"
        )
    for item in content:
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise TokenizerError(f"chat message {index}: a text item needs a string 'text', got {item!r:.80}")
        elif kind != "image":
            raise TokenizerError(
                f"chat message {index}: content items must be {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image', one of {list(IMAGE_KEYS)}: ...}}, got {item!r:.80}"
            )
    return list(content)
