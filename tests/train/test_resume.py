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


def _short_sft(out: Path, mm_dir: Path, data: Path, **train) -> dict:
    return run_config("sft", out, mm_dir, data, [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train"}],
                      optim={"lr": 1e-3, "schedule": "linear"},
                      train={"steps": 4, "batch_size": 2, "checkpoint_every": 2, **train})  # fmt: skip


def test_resume_with_more_steps_and_a_new_lr_rebuilds_the_schedule_and_says_so(tmp_path, mm_dir, shared_data, capsys):
    """A 4-step run (lr 1e-3, linear decay to 0) resumed with steps = 6 and lr = 5e-2: steps 5 and 6 follow the new
    schedule (5e-2 decaying linearly over 6 steps), not the old one's end (lr 0), and the trainer says so."""
    from openmedgemma.train.config import config_from_dict
    from openmedgemma.train.loop import Schedule, Trainer

    out = tmp_path / "run"
    first = train(_short_sft(out, mm_dir, shared_data))
    assert [h["lr"] for h in first["history"]] == pytest.approx([1e-3 * (1 - s / 4) for s in range(4)])
    cfg = _short_sft(out, mm_dir, shared_data, steps=6)
    cfg["optim"]["lr"] = 5e-2
    trainer = Trainer(config_from_dict(cfg), resume=out)
    summary = trainer.run()
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs[4:] == pytest.approx([5e-2 * Schedule(0, 6)(s) for s in (4, 5)])  # 0.0167, 0.0083: not 0
    assert lrs[:4] == pytest.approx([h["lr"] for h in first["history"]])  # history of the first session kept
    err = capsys.readouterr().err
    assert "resuming at step 4 with optim.lr 0.001 -> 0.05, train.steps 4 -> 6" in err
    assert "the lr schedule are rebuilt from the new config" in err and err == f"openmedgemma train: {trainer.resume_note}\n"
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 5e-2  # the run's config is the new one


def test_resume_with_a_config_that_breaks_the_run_is_refused_naming_the_keys(tmp_path, mm_dir, shared_data, tok_dir):
    from tests.train.helpers import write_medgemma

    out = tmp_path / "run"
    train(_short_sft(out, mm_dir, shared_data))
    other_model = write_medgemma(tmp_path / "other", tok_dir, seed=5)
    cfg = _short_sft(out, other_model, shared_data, batch_size=4, steps=6)
    cfg["data"]["sources"][0]["split"] = "validation"
    with pytest.raises(CheckpointError) as err:
        train(cfg, resume=out)
    message = str(err.value)
    assert "the config differs from the one this run was trained with" in message
    assert f"model.path {str(mm_dir)!r} -> {str(other_model)!r}" in message
    assert "train.batch_size 2 -> 4" in message and "data.sources [" in message
    assert "train.steps" not in message.split("Restore")[0]  # a schedule change is not what breaks it
    # bookkeeping may change freely: logging, checkpoint cadence, progress bar
    ok = _short_sft(out, mm_dir, shared_data, log_every=2, checkpoint_every=0, keep_checkpoints=1)
    assert [h["step"] for h in train(ok, resume=out)["history"]] == [1, 2, 3, 4]
