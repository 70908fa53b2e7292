"""Tokenizer folders built once per session, and the transformers objects that read them (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from openmedgemma.tokenizer import Tokenizer, build_tokenizer

# Text the ordinary pieces are trained on. Deliberately ASCII only, so "é", "肺" and emoji go through
# byte fallback.
CORPUS = [
    "The chest X-ray shows a small left pleural effusion and no pneumothorax.",
    "No acute cardiopulmonary process. The heart size is normal.",
    "Describe the image. What is the most likely diagnosis? Answer with one word.",
    "Final Answer: (B) because the lungs are clear and the mediastinum is not widened.",
    "thought The patient is 54 years old with a cough for 3 weeks; consider pneumonia.",
] * 8


@pytest.fixture(scope="session")
def corpus():
    return list(CORPUS)


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("official"), "official", CORPUS)


@pytest.fixture(scope="session")
def compact_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("compact"), "compact", CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def official(official_dir):
    return Tokenizer.from_pretrained(official_dir)


@pytest.fixture(scope="session")
def compact(compact_dir):
    return Tokenizer.from_pretrained(compact_dir)


@pytest.fixture(scope="session")
def hf_official(official_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(official_dir)


@pytest.fixture(scope="session")
def hf_compact(compact_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(compact_dir)


@pytest.fixture(scope="session")
def make_processor():
    """make_processor(hf_tokenizer, image_seq_length): transformers' Gemma3Processor (28x28 images: the ids
    do not depend on the image size)."""
    from transformers import Gemma3Processor

    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as Images
    except ImportError:  # a transformers without the PIL backend class
        from transformers import Gemma3ImageProcessor as Images

    def make(hf_tokenizer, image_seq_length):
        return Gemma3Processor(
            image_processor=Images(size={"height": 28, "width": 28}),
            tokenizer=hf_tokenizer,
            image_seq_length=image_seq_length,
            chat_template=hf_tokenizer.chat_template,
        )

    return make


@pytest.fixture(scope="session")
def random_image():
    """random_image(seed): a small random RGB PIL image."""

    def make(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))

    return make
