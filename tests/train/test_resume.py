"""Checkpoints: a run killed with SIGKILL and resumed gives the loss curve of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openmedgemma.errors import CheckpointError
from openmedgemma.train import checkpointing
from tests.conftest import REPO_ROOT
from tests.train.helpers import losses, run_config, to_toml, train

STEPS = 16


def config(out: Path, mm_dir: Path, data: Path) -> dict:
    sources = [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train", "weight": 2.0},
               {"kind": "pneumonia_mnist", "path": "medmnist", "split": "train", "weight": 1.0}]  # fmt: skip
    return run_config("sft", out, mm_dir, data, sources,
                      optim={"schedule": "cosine", "warmup_steps": 3, "lr": 2e-3, "weight_decay": 0.01},
                      train={"steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 3,
                             "keep_checkpoints": 2})  # fmt: skip


def cli(config_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "openmedgemma.train.cli", "train", "sft", "--config", str(config_file), *extra]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, mm_dir, shared_data):
    reference = losses(train(config(tmp_path / "reference", mm_dir, shared_data)))

    out = tmp_path / "killed"
    config_file = tmp_path / "run.toml"
    config_file.write_text(to_toml(config(out, mm_dir, shared_data)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(cli(config_file), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if log.exists() and any(r["step"] >= 7 for r in read_log(log)):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run was not killed mid-way (exit {victim.returncode}): {stderr[-2000:]}"
    resumed_from = checkpointing.find_checkpoint(out)
    start = int(resumed_from.name.split("_")[1])
    assert 3 <= start < STEPS
    (out / "checkpoints" / "step_0000099.tmp").mkdir()  # a save cut short: must be ignored

    done = subprocess.run(cli(config_file, "--resume", str(out)), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_log(log)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # steps after the checkpoint logged once
    assert [r["loss"] for r in records] == pytest.approx(reference, abs=1e-6, rel=0)
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()


def test_rl_resume_replays_rollouts_and_sampling(tmp_path, mm_dir, shared_data):
    """RL keeps its rollout buffer (rl.epochs = 2) and the sampling RNG in the checkpoint."""
    from openmedgemma.train.rewards import register_reward

    register_reward("short_answer", lambda completion, example: -len(completion) / 10)
    sources = [{"kind": "pneumonia_mnist", "path": "medmnist", "split": "train"}]
    rl = {"group_size": 3, "max_new_tokens": 3, "epochs": 2, "rewards": {"short_answer": 1.0}, "rollout": "simple"}
    cfg = run_config("rl", tmp_path / "a", mm_dir, shared_data, sources, rl=rl,
                     train={"steps": 6, "batch_size": 2, "checkpoint_every": 3, "keep_checkpoints": 3})  # fmt: skip
    full = train(cfg)["history"]
    assert any(h["loss"] != 0 for h in full)
    cfg["output_dir"] = str(tmp_path / "b")
    resumed = train(cfg, resume=tmp_path / "a" / "checkpoints" / "step_0000003")["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward", "grad_norm"):
        assert [h[key] for h in resumed[3:]] == pytest.approx([h[key] for h in full[3:]], abs=1e-6, rel=0)


def test_output_dir_of_an_earlier_run_needs_resume(tmp_path, mm_dir, shared_data):
    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, [{"kind": "vqa_rad", "path": "vqa_rad"}],
                     train={"steps": 1, "batch_size": 2})  # fmt: skip
    train(cfg)
    with pytest.raises(CheckpointError, match=r"already holds a run \(metrics.jsonl\); pass --resume"):
        train(cfg)
    with pytest.raises(CheckpointError, match="no complete training checkpoint to resume from"):
        train(cfg, resume=tmp_path / "run")
