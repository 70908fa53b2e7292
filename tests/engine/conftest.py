"""Tiny models for the engine tests, written once per session and loaded back through files."""

from __future__ import annotations

import pytest

from openmedgemma import MedGemma
from tests import tiny


@pytest.fixture(scope="session")
def hf_mm(tmp_path_factory):
    """(transformers Gemma3ForConditionalGeneration, folder it was saved to); varied greedy outputs, no eos."""
    model = tiny.hf_generation_model(tiny.gemma_mm_hf_config())
    folder = tmp_path_factory.mktemp("hf_mm")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def hf_text(tmp_path_factory):
    model = tiny.hf_generation_model(tiny.gemma_text_hf_config(), seed=4)  # a seed with varied continuations
    folder = tmp_path_factory.mktemp("hf_text")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def hf_mm_wide(tmp_path_factory):
    """As hf_mm with a 32-token sliding window: an image prompt fits inside the window."""
    model = tiny.hf_generation_model(tiny.gemma_mm_hf_config({"sliding_window": 32}))
    folder = tmp_path_factory.mktemp("hf_mm_wide")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def ours_mm_wide(hf_mm_wide):
    return MedGemma.from_pretrained(hf_mm_wide[1])


@pytest.fixture(scope="session")
def ours_mm(hf_mm):
    return MedGemma.from_pretrained(hf_mm[1])


@pytest.fixture(scope="session")
def ours_text(hf_text):
    return MedGemma.from_pretrained(hf_text[1])


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    """A tiny multimodal checkpoint with its tokenizer, as `openmedgemma ask --model` takes it."""
    return tiny.chat_checkpoint(tmp_path_factory.mktemp("chat_ckpt"))


@pytest.fixture(scope="session")
def engine(chat_dir):
    from openmedgemma.engine import Engine

    return Engine.from_pretrained(chat_dir)
