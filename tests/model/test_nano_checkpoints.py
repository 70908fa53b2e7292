"""The committed nano checkpoints (models/medgemma-nano, models/medsiglip-nano) load in transformers and in
ours, through transformers' own processors, and give the same logits (fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
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


def transformers_warnings(folder: Path) -> str:
    """What loading `folder`'s model in a fresh process logs (transformers warns once per process)."""
    code = f"import transformers; transformers.SiglipModel.from_pretrained({str(folder)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_medsiglip_nano_config_names_the_spiece_ids_and_loads_without_warnings(tmp_path):
    import sentencepiece

    spiece = sentencepiece.SentencePieceProcessor(model_file=str(MEDSIGLIP / "spiece.model"))
    text = read_hf_config(MEDSIGLIP)["text_config"]
    assert text["bos_token_id"] is None and spiece.bos_id() == -1  # the model has no <s>
    assert text["eos_token_id"] == spiece.eos_id() == 1 and spiece.id_to_piece(1) == "</s>"
    assert text["pad_token_id"] == 1  # SigLIP pads with </s>, as the tokenizer_config says
    config = transformers.AutoConfig.from_pretrained(MEDSIGLIP)
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (None, 1)
    # (transformers also builds its own default SiglipTextConfig, vocabulary 32000, which warns about itself)
    assert "within the vocabulary (between 0 and 1023)" not in transformers_warnings(MEDSIGLIP)

    # the ids change nothing the model computes: logits equal those with the old config (no ids: CLIP's defaults)
    old = tmp_path / "old"
    old.mkdir()
    for path in MEDSIGLIP.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    before = read_hf_config(MEDSIGLIP)
    for key in ("bos_token_id", "eos_token_id"):
        del before["text_config"][key]
    (old / "config.json").write_text(json.dumps(before))
    processor = transformers.AutoProcessor.from_pretrained(MEDSIGLIP)
    inputs = processor(text=["Normal chest X-ray.", "Pneumonia."], images=Image.open(CXR), padding="max_length",
                       max_length=32, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        now = transformers.SiglipModel.from_pretrained(MEDSIGLIP).eval()(**inputs).logits_per_image
        then = transformers.SiglipModel.from_pretrained(old).eval()(**inputs).logits_per_image
    assert transformers.SiglipModel.from_pretrained(old).config.text_config.bos_token_id == 49406
    assert "bos_token_id must be `None` or an integer within the vocabulary (between 0 and 1023)" in (
        transformers_warnings(old)
    )
    assert torch.equal(now, then)


def test_medgemma_nano_generation_stops_at_the_end_of_the_turn():
    config = transformers.GenerationConfig.from_pretrained(MEDGEMMA)
    tok = Tokenizer.from_pretrained(MEDGEMMA)
    assert config.eos_token_id == [tok.eos_id, tok.end_of_turn_id] and config.pad_token_id == tok.pad_id


@pytest.mark.parametrize("folder", [MEDGEMMA, MEDSIGLIP], ids=["medgemma", "medsiglip"])
def test_model_card_names_the_demonstration_status(folder):
    card = (folder / "README.md").read_text(encoding="utf-8").lower()
    assert "not for clinical use" in card
