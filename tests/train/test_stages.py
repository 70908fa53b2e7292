"""Each stage trains a tiny model on real data from the shared folder, and its objective clearly improves."""

from __future__ import annotations

import json
import math

import pytest
import torch

from openmedgemma import MedGemma, MedSigLIP
from tests.train import helpers
from tests.train.helpers import losses, mean, run_config, train

VQA_TRAIN = {"kind": "vqa_rad", "path": "vqa_rad", "split": "train"}
PNEUMONIA = {"kind": "pneumonia_mnist", "path": "medmnist", "split": "train"}


def assert_decreases(values: list[float], factor: float) -> None:
    first, last = mean(values[:5]), mean(values[-5:])
    print(f"mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f} ({last / first:.2f}x)")
    assert last < factor * first, f"loss did not clearly decrease: first 5 steps {first:.4f}, last 5 {last:.4f}"


def test_siglip_on_vqa_rad_captions_and_pneumonia_mnist(tmp_path, siglip_dir, shared_data):
    sources = [{**VQA_TRAIN, "format": "caption"}, {**PNEUMONIA, "format": "caption", "weight": 1.0}]
    cfg = run_config("siglip", tmp_path / "run", siglip_dir, shared_data, sources, siglip={"text_length": 32},
                     train={"steps": 30, "batch_size": 16}, optim={"lr": 2e-3})  # fmt: skip
    summary = train(cfg)
    values = losses(summary)
    assert len(values) == 30
    assert_decreases(values, 0.6)
    model = MedSigLIP.from_pretrained(summary["outputs"]["final"])  # HF layout, reloadable
    assert model.logit_bias.item() != pytest.approx(-10.0)  # the learnable bias moved


def test_pretrain_on_captions_and_pubmedqa_text(tmp_path, mm_dir, shared_data):
    sources = [{**VQA_TRAIN, "format": "caption", "weight": 1.0},
               {"kind": "pubmedqa", "path": "pubmedqa", "split": "train", "format": "text", "weight": 1.0}]  # fmt: skip
    summary = train(run_config("pretrain", tmp_path / "run", mm_dir, shared_data, sources, train={"steps": 25}))
    assert_decreases(losses(summary), 0.8)


def test_sft_on_vqa_rad_with_eval(tmp_path, mm_dir, shared_data):
    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, [VQA_TRAIN], train={"steps": 30, "eval_every": 15},
                     eval={"sources": [{**VQA_TRAIN, "split": "validation"}], "max_batches": 2})  # fmt: skip
    summary = train(cfg)
    values = losses(summary)
    assert_decreases(values, 0.7)
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])
    assert MedGemma.from_pretrained(summary["outputs"]["final"]).config.is_multimodal


def test_distill_from_a_sparse_teacher_store(tmp_path, tok, tok_dir, shared_data):
    from openmedgemma.train.collate import LMCollator
    from openmedgemma.train.data import mcq
    from openmedgemma.train.distill import TeacherStore, write_teacher_store

    teacher_dir = helpers.write_medgemma(tmp_path / "teacher", tok_dir, multimodal=False, seed=1)
    student_dir = helpers.write_medgemma(tmp_path / "student", tok_dir, multimodal=False, seed=2)
    teacher = MedGemma.from_pretrained(teacher_dir)
    from tests import tiny

    tiny.randomize(teacher, seed=3)  # a peaked teacher distribution, unlike the student's near-uniform start
    examples = mcq(shared_data / "mmlu_medical_csv", "test")[:48]
    collator = LMCollator(tok, mode="chat", max_length=256, multimodal=False)
    store = write_teacher_store(tmp_path / "store", teacher, collator, examples, k=32, selection="sample", batch_size=8)
    assert len(TeacherStore(store)) == 48
    sources = [{"kind": "teacher_store", "path": str(store)}]
    summary = train(run_config("distill", tmp_path / "run", student_dir, shared_data, sources, train={"steps": 25}))
    assert_decreases(losses(summary), 0.8)


def test_rl_grpo_raises_the_reward_on_pneumonia_mnist(tmp_path, mm_dir, shared_data):
    """A few SFT steps teach the answer format poorly; GRPO with the exact-match reward then clearly raises the
    mean reward of its own rollouts (the loss of policy-gradient methods is no progress measure)."""
    warm = train(run_config("sft", tmp_path / "sft", mm_dir, shared_data, [PNEUMONIA], train={"steps": 4}))
    cfg = run_config("rl", tmp_path / "rl", warm["outputs"]["final"], shared_data, [PNEUMONIA],
                     train={"steps": 24}, optim={"lr": 2e-3},
                     rl={"group_size": 4, "max_new_tokens": 4, "rewards": {"exact_match": 1.0}, "rollout": "simple"})  # fmt: skip
    rewards = losses(train(cfg), "reward")
    first, last = mean(rewards[:6]), mean(rewards[-6:])
    print(f"mean reward of the first 6 steps {first:.3f}, of the last 6 {last:.3f}")
    assert last > first + 0.2, f"reward did not rise: first 6 steps {first:.3f}, last 6 {last:.3f}"


def test_gradient_checkpointing_changes_nothing_and_bf16_autocast_trains(tmp_path, mm_dir, shared_data):
    calls = []

    def hook(trainer, step):
        calls.append(step)
        return {"hook_step": step}

    base = run_config("sft", tmp_path / "a", mm_dir, shared_data, [VQA_TRAIN], train={"steps": 3, "batch_size": 4})
    plain = train(base, eval_hooks=[hook])
    assert calls == []  # eval_every = 0
    ckpt = {**base, "output_dir": str(tmp_path / "b"), "model": {**base["model"], "gradient_checkpointing": True},
            "train": {**base["train"], "eval_every": 2}}  # fmt: skip
    checkpointed = train(ckpt, eval_hooks=[hook])
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-6, rel=0)
    assert calls == [2] and checkpointed["history"][1]["hook_step"] == 2
    bf16 = {**base, "output_dir": str(tmp_path / "c"), "train": {**base["train"], "precision": "bf16-autocast"}}
    values = losses(train(bf16))
    assert all(math.isfinite(v) for v in values)
    assert values == pytest.approx(losses(plain), rel=0.05)  # bf16 rounding, same trajectory


def test_engine_rollout_samples_what_the_simple_sampler_samples(mm_dir, tok, shared_data):
    """The engine's KV-cache sampler and the trainer's recompute sampler agree token for token (top_k = 1)."""
    from openmedgemma.train.collate import LMCollator
    from openmedgemma.train.data import pneumonia_mnist
    from openmedgemma.train.modeling import LMModule
    from openmedgemma.train.rollout import engine_rollout, sample_completions

    model = MedGemma.from_pretrained(mm_dir).eval()
    collate = LMCollator(tok, image_seq_length=16, image_size=56)
    examples = pneumonia_mnist(shared_data / "medmnist", "val")[:3]
    prompts = [collate.prompt_ids(ex) for ex in examples]
    pixels = [collate.cache.pixel_values(list(ex.images), 56) for ex in examples]
    module = LMModule(model)
    simple = sample_completions(lambda i, m, pv: module(input_ids=i, attention_mask=m, pixel_values=pv, mode="logits"),
                                prompts, pixels, 2, max_new_tokens=6, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                                top_k=1)  # fmt: skip
    engine = engine_rollout(model, max_new_tokens=6, temperature=1.0, top_k=1, stop_ids=tok.stop_ids)(prompts, pixels, 2)
    assert engine == simple and all(len(c) >= 1 for c in simple)


def test_teacher_store_command(tmp_path, tok_dir, shared_data, capsys):
    from openmedgemma.train.cli import main
    from openmedgemma.train.distill import TeacherStore

    teacher = helpers.write_medgemma(tmp_path / "teacher", tok_dir, multimodal=False)
    sources = [{"kind": "mcq", "path": "mmlu_medical_csv", "split": "dev", "limit": 6}]
    (tmp_path / "text.toml").write_text(helpers.to_toml(run_config("sft", tmp_path / "unused", teacher, shared_data, sources)))
    argv = ["train", "teacher-store", "--teacher", str(teacher), "--config", str(tmp_path / "text.toml"),
            "--out", str(tmp_path / "store"), "--k", "8", "--selection", "topk"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    store = TeacherStore(tmp_path / "store")
    assert len(store) == 6 and store.k == 8 and store.manifest["selection"] == "topk"
    item = store[0]
    n_answer = int((item["labels"] != -100).sum())
    assert item["indices"].shape == (n_answer, 8) and (item["probs"][:, :-1] >= item["probs"][:, 1:]).all()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwrites a store


def test_freezing_by_part_trains_only_the_rest(tmp_path, mm_dir, shared_data):
    from safetensors.torch import load_file

    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, [VQA_TRAIN], train={"steps": 2, "batch_size": 2},
                     freeze=["language_model", "multi_modal_projector"])  # fmt: skip
    final = load_file(str(train(cfg)["outputs"]["final"] + "/model.safetensors"))
    base = load_file(str(mm_dir / "model.safetensors"))
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], final[k])}
    assert changed == {"vision_tower"}


def test_pretraining_a_fresh_model_from_a_config_file(tmp_path, tok, tok_dir, shared_data):
    (tmp_path / "config.json").write_text(json.dumps(helpers.medgemma_hf_config(tok)))
    sources = [{"kind": "pubmedqa", "path": "pubmedqa", "split": "train", "format": "text"}]
    cfg = run_config("pretrain", tmp_path / "run", tmp_path, shared_data, sources, train={"steps": 8, "batch_size": 2},
                     data={"max_length": 64})  # fmt: skip
    cfg["model"] = {"config": str(tmp_path / "config.json"), "tokenizer": str(tok_dir), "init_std": 0.02}
    values = losses(train(cfg))
    # a fresh model predicts close to uniformly: logits of std ~1 give log(vocab) + ~0.5
    assert math.log(tok.vocab_size) < values[0] < math.log(tok.vocab_size) + 1
    assert mean(values[-3:]) < values[0]
    assert MedGemma.from_pretrained(tmp_path / "run" / "final").config.text.vocab_size == tok.vocab_size


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora"])
def test_rl_with_kl_uses_the_starting_model_as_reference(tmp_path, mm_dir, shared_data, lora):
    """kl_coef > 0: the reference log-probs are the starting model's (a frozen copy with full weights; the same
    model with its adapters disabled under LoRA), the KL starts at 0 and grows once the policy moves."""
    from openmedgemma.train.config import config_from_dict
    from openmedgemma.train.loop import Trainer
    from openmedgemma.train.modeling import LMModule

    sections = dict(train={"steps": 3, "batch_size": 2}, optim={"lr": 5e-3},
                    rl={"group_size": 2, "max_new_tokens": 4, "rewards": {"tests.train.helpers:text_length_reward": 1.0},
                        "rollout": "simple", "kl_coef": 0.5})  # fmt: skip
    if lora:
        sections.update(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "parts": ["language_model"]})
    trainer = Trainer(config_from_dict(run_config("rl", tmp_path / "rl", mm_dir, shared_data, [PNEUMONIA], **sections)))
    summary = trainer.run()
    assert (trainer.stage.ref_model is None) == lora  # LoRA: no copy of the weights
    kl = losses(summary, "kl")
    assert kl[0] == 0.0 and kl[-1] > 0, kl  # step 1 samples from the reference itself

    batch = trainer.stage._batches[-1]  # the last rollouts, made after two updates
    start = LMModule(MedGemma.from_pretrained(mm_dir)).eval()
    with torch.no_grad():
        expected = start(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], completion_mask=batch["completion_mask"], mode="logp")
        policy = trainer.stage.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      pixel_values=batch["pixel_values"], completion_mask=batch["completion_mask"],
                                      mode="logp")  # fmt: skip
    torch.testing.assert_close(batch["ref_logp"], expected, atol=1e-5, rtol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # the policy did move away from the reference
