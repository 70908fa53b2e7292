"""Session fixtures for the training tests: a tokenizer trained on the shared data, tiny checkpoints."""

from __future__ import annotations

import pytest

from tests.train import helpers


@pytest.fixture(scope="session")
def tok_dir(shared_data, tmp_path_factory):
    return helpers.write_tokenizer(tmp_path_factory.mktemp("tok"), shared_data)


@pytest.fixture(scope="session")
def tok(tok_dir):
    from openmedgemma.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def mm_dir(tok_dir, tmp_path_factory):
    """A tiny multimodal MedGemma checkpoint (2 layers, 56 px images, 16 soft tokens) + tokenizer."""
    return helpers.write_medgemma(tmp_path_factory.mktemp("mm"), tok_dir)


@pytest.fixture(scope="session")
def siglip_dir(shared_data, tmp_path_factory):
    return helpers.write_medsiglip(tmp_path_factory.mktemp("siglip"), shared_data)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    waiting for a descheduled sibling make steps 10-30x slower. It also keeps float results independent of the
    machine's core count (the golden losses)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
