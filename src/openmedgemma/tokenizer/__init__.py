"""openmedgemma.tokenizer: the MedGemma tokenizer, chat format and thinking split, without transformers.

    tok = Tokenizer.from_pretrained("path/to/medgemma-4b-it")
    ids = tok.encode_chat([{"role": "user", "content": [{"type": "image", "path": "cxr.png"},
                                                          {"type": "text", "text": "Findings?"}]}])
    stream = tok.incremental_decoder()
    ... stream.push(next_id) ...
    thought, answer = tok.decode_thinking(generated_ids)
"""

from openmedgemma.errors import TokenizerError  # what its functions raise, importable where they are called
from openmedgemma.tokenizer.build import build_siglip_tokenizer, build_tokenizer, compact_layout, official_layout
from openmedgemma.tokenizer.chat import (
    CHAT_TEMPLATE,
    IMAGE_SEQ_LENGTH,
    count_images,
    expand_images,
    image_sequence,
    render_chat,
)
from openmedgemma.tokenizer.core import SPECIAL_TOKENS, IncrementalDecoder, Tokenizer
from openmedgemma.tokenizer.siglip import SiglipTextTokenizer
from openmedgemma.tokenizer.thinking import THOUGHT_END, THOUGHT_START, split_thinking

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_SEQ_LENGTH",
    "SPECIAL_TOKENS",
    "SiglipTextTokenizer",
    "THOUGHT_END",
    "THOUGHT_START",
    "IncrementalDecoder",
    "Tokenizer",
    "TokenizerError",
    "build_siglip_tokenizer",
    "build_tokenizer",
    "compact_layout",
    "count_images",
    "expand_images",
    "image_sequence",
    "official_layout",
    "render_chat",
    "split_thinking",
]
