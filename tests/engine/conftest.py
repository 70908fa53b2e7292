"""Tiny models for the engine tests, written once per session and loaded back through files."""

from __future__ import annotations

import pytest

from openmedgemma import MedGemma
from tests import tiny
from tests.ci import in_ci


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


@pytest.fixture(scope="session")
def pacsman_series(shared_data):
    """The shared 128-slice synthetic MR series (file names not in slice order)."""
    return shared_data / "dicom" / "pacsman_synthetic" / "dicomseries"


@pytest.fixture(scope="session")
def kernel():
    """The engine's native CPU library (every kernel of `native.SOURCES`): built and loaded, or the test is
    skipped on a machine that cannot build it. In CI (x86-64 with g++) a missing library is a failure: decode
    would silently fall back to torch's slow kernels."""
    from openmedgemma.engine import half, int4, native

    if not native.int8_gemv_available():
        if in_ci():
            pytest.fail("the CPU kernels did not build in CI (see the message on stderr)")
        pytest.skip("the CPU kernels cannot be built or run on this machine")
    half.kernel_available(), int4.kernel_isa()  # their ops' fakes (for opcheck / torch.compile) registered
