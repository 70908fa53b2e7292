"""The chat template we compare with transformers is Google's, byte for byte.

The parity tests render with transformers using the template that `build_tokenizer` writes (our copy,
`CHAT_TEMPLATE`); were that copy edited, both sides would change together and still agree. So the copy is
pinned here by the sha256 of the official text: the `chat_template` string of google/gemma-3-4b-it's (and
google/medgemma-4b-it's) tokenizer_config.json, 1532 characters, which two independent public copies of it
(a function-calling benchmark's Gemma handler quoting that tokenizer_config.json, and an ONNX Runtime tokenizer
extension's GEMMA3_CHAT_TEMPLATE) reproduce exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from openmedgemma.tokenizer.chat import CHAT_TEMPLATE

OFFICIAL_GEMMA3_TEMPLATE_SHA256 = "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4"
ROOT = Path(__file__).resolve().parents[2]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_our_template_is_the_official_gemma3_template():
    assert len(CHAT_TEMPLATE) == 1532
    assert sha256(CHAT_TEMPLATE) == OFFICIAL_GEMMA3_TEMPLATE_SHA256


def test_tokenizer_folders_carry_the_official_template(official_dir, compact_dir):
    """What transformers reads in the parity tests, and what the committed nano checkpoint ships."""
    nano = ROOT / "models" / "medgemma-nano"
    files = [official_dir / "tokenizer_config.json", compact_dir / "tokenizer_config.json",
             nano / "tokenizer_config.json", nano / "chat_template.json"]  # fmt: skip
    for path in files:
        assert sha256(json.loads(path.read_text(encoding="utf-8"))["chat_template"]) == OFFICIAL_GEMMA3_TEMPLATE_SHA256, path
