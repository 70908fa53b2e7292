"""The committed nano checkpoints (models/medgemma-nano, models/medsiglip-nano) load in transformers and in
ours, through transformers' own processors, and give the same logits (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from openmedgemma import MedGemma, MedSigLIP
from openmedgemma.config import from_hf_config, get_config, read_hf_config
from openmedgemma.imaging import to_pixel_values
from openmedgemma.tokenizer import SiglipTextTokenizer, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MEDGEMMA, MEDSIGLIP = ROOT / "models" / "medgemma-nano", ROOT / "models" / "medsiglip-nano"
CXR = ROOT / "examples" / "cxr_nih_00000001_000.png"
TOL = dict(atol=3e-5, rtol=3e-5)
MB = 1 << 20


def test_committed_folders_are_complete_and_small():
    sizes = sum(p.stat().st_size for folder in (MEDGEMMA, MEDSIGLIP) for p in folder.iterdir())
    assert sizes <= 50 * MB, f"the nano checkpoints take {sizes / MB:.1f} MB, more than 50 MB"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.json", "README.md"):  # fmt: skip
        assert (MEDGEMMA / name).is_file(), name
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer_config.json", "preprocessor_config.json",
                 "README.md"):  # fmt: skip
        assert (MEDSIGLIP / name).is_file(), name
    assert from_hf_config(read_hf_config(MEDGEMMA)) == get_config("nano")
    assert from_hf_config(read_hf_config(MEDSIGLIP)) == get_config("medsiglip-nano")


def test_medgemma_nano_same_logits_in_transformers_and_ours():
    processor = transformers.AutoProcessor.from_pretrained(MEDGEMMA)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(MEDGEMMA, dtype=torch.float32).eval()
    image = Image.open(CXR)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Is the heart enlarged?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip

    ours = MedGemma.from_pretrained(MEDGEMMA)
    tok = Tokenizer.from_pretrained(MEDGEMMA)
    ids = tok.encode_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the heart enlarged?"}]}],
                          image_seq_length=ours.config.mm_tokens_per_image)  # fmt: skip
    assert ids == inputs["input_ids"][0].tolist()  # our tokenizer and chat template == the processor's
    pixels = to_pixel_values([np.asarray(image.convert("RGB"))], ours.config.vision.image_size)
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=0, rtol=0)

    with torch.no_grad():
        ref = hf(**inputs).logits  # token_type_ids included: bidirectional attention inside the image
        got = ours(torch.tensor([ids]), pixel_values=pixels)
    torch.testing.assert_close(got, ref, **TOL)
    assert ref[0, -1].argmax() != tok.pad_id  # a trained model, not an all-pad one


def test_medsiglip_nano_same_logits_in_transformers_and_ours():
    processor = transformers.AutoProcessor.from_pretrained(MEDSIGLIP)
    hf = transformers.SiglipModel.from_pretrained(MEDSIGLIP, dtype=torch.float32).eval()
    texts = ["A normal pediatric chest X-ray without pneumonia.", "A pediatric chest X-ray showing pneumonia.", "Head CT."]
    image = Image.open(CXR)
    inputs = processor(text=texts, images=image, padding="max_length", max_length=32, return_tensors="pt")

    ours = MedSigLIP.from_pretrained(MEDSIGLIP)
    ids = SiglipTextTokenizer.from_pretrained(MEDSIGLIP)(texts)
    assert torch.equal(ids, inputs["input_ids"])
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits_per_image
        got = ours(ids, inputs["pixel_values"]).logits_per_image
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("folder", [MEDGEMMA, MEDSIGLIP], ids=["medgemma", "medsiglip"])
def test_model_card_names_the_demonstration_status(folder):
    card = (folder / "README.md").read_text(encoding="utf-8").lower()
    assert "not for clinical use" in card
