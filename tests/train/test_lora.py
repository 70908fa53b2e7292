"""LoRA / QLoRA through peft on our modules: train, save in PEFT format, load back, merge, identical logits."""

from __future__ import annotations

import json

import peft  # noqa: F401  a dev dependency: if it is missing this must fail, not skip
import pytest
import torch
from safetensors.torch import load_file

from openmedgemma import MedGemma
from openmedgemma.train.collate import LMCollator
from openmedgemma.train.data import vqa_rad
from tests import tiny
from tests.train.helpers import losses, run_config, train

VQA = [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train"}]


def batch_of(tok, data, n=3):
    examples = vqa_rad(data / "vqa_rad", "validation")[:n]
    return LMCollator(tok, image_seq_length=tiny.TOKENS_PER_IMAGE, image_size=tiny.IMAGE_SIZE)(examples)


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])


def test_lora_train_save_load_merge_round_trip(tmp_path, mm_dir, tok, shared_data):
    from openmedgemma.train.lora import load_adapter

    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, VQA, train={"steps": 6},
                     lora={"enabled": True, "r": 4, "alpha": 8, "parts": ["language_model"]}, freeze=["vision_tower"])  # fmt: skip
    summary = train(cfg)
    adapter, final = tmp_path / "run" / "adapter", tmp_path / "run" / "final"
    assert summary["outputs"] == {"adapter": str(adapter), "final": str(final)}
    assert losses(summary)[-1] < losses(summary)[0]

    # PEFT format: config + safetensors holding only adapter weights, on the decoder's linear layers
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.05)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert all(".language_model." in k for k in weights)
    assert {k.split(".")[-3] for k in weights} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # trained (B starts at 0)

    batch = batch_of(tok, shared_data)
    base = MedGemma.from_pretrained(mm_dir)
    before = logits(base, batch)
    with_adapter = logits(load_adapter(MedGemma.from_pretrained(mm_dir), adapter).eval(), batch)
    merged_model = MedGemma.from_pretrained(final)
    merged = logits(merged_model, batch)
    assert not torch.allclose(with_adapter, before, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(merged, with_adapter, atol=2e-5, rtol=2e-5)  # merging changes nothing else
    # freezing by part: the vision tower and projector are bit-identical to the base
    base_sd, merged_sd = base.state_dict(), merged_model.state_dict()
    for name in base_sd:
        if not name.startswith("language_model."):
            assert torch.equal(base_sd[name], merged_sd[name]), name
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()


def test_qlora_nf4_trains_adapters_over_a_4bit_base_and_merges_into_full_precision(tmp_path, mm_dir, tok, shared_data):
    import bitsandbytes as bnb  # a dev dependency: its absence must fail, not skip

    from openmedgemma.train.config import config_from_dict
    from openmedgemma.train.loop import Trainer
    from openmedgemma.train.lora import load_adapter

    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, VQA, train={"steps": 4},
                     lora={"enabled": True, "r": 4, "quantize": "nf4"})  # fmt: skip
    trainer = Trainer(config_from_dict(cfg))
    summary = trainer.run()
    model = trainer.stage.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert losses(summary)[-1] < losses(summary)[0]
    batch = batch_of(tok, shared_data)
    expected = logits(load_adapter(MedGemma.from_pretrained(mm_dir), tmp_path / "run" / "adapter").eval(), batch)
    merged = logits(MedGemma.from_pretrained(tmp_path / "run" / "final"), batch)
    torch.testing.assert_close(merged, expected, atol=2e-5, rtol=2e-5)


def test_lora_resume_restores_adapters_optimizer_and_dropout_rng(tmp_path, mm_dir, shared_data):
    cfg = run_config("sft", tmp_path / "a", mm_dir, shared_data, VQA, lora={"enabled": True, "r": 4, "dropout": 0.3},
                     train={"steps": 4, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 3})  # fmt: skip
    full = losses(train(cfg))
    cfg["output_dir"] = str(tmp_path / "b")
    resumed = losses(train(cfg, resume=tmp_path / "a" / "checkpoints" / "step_0000002"))
    assert resumed[2:] == pytest.approx(full[2:], abs=1e-6, rel=0)
    cfg["output_dir"], cfg["lora"]["dropout"] = str(tmp_path / "c"), 0.0  # another dropout draws other masks
    assert losses(train(cfg, resume=tmp_path / "a" / "checkpoints" / "step_0000002"))[2:] != pytest.approx(full[2:], abs=1e-6)
