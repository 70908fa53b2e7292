"""Two CPU processes (torchrun, gloo) train exactly as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.train.helpers import run_config, to_toml, train

STEPS = 3


def config(out: Path, mm_dir: Path, data: Path, **train_overrides) -> dict:
    sources = [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train"}]
    # lr 2e-4 as the official fine-tuning notebook; AdamW turns float-rounding differences of tiny gradients into
    # parameter differences of up to ~lr / 200 here, so the 1e-6 bound needs a realistic fine-tuning lr
    return run_config("sft", out, mm_dir, data, sources, optim={"lr": 2e-4, "weight_decay": 0.01},
                      train={"steps": STEPS, "batch_size": 8, "checkpoint_every": 2, **train_overrides})  # fmt: skip


def torchrun(tmp_path: Path, stage: str, cfg: dict, *args: str) -> list[dict]:
    """`openmedgemma train <stage>` in 2 processes (torchrun, gloo); its metrics log, one dict per step."""
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "openmedgemma.train.cli", "train", stage, "--config", str(tmp_path / "run.toml"), *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, mm_dir, shared_data):
    """One process, the whole global batch of 8 in one micro-batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    summary = train(config(out, mm_dir, shared_data))
    return summary["history"], load_file(str(out / "final" / "model.safetensors")), out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, mm_dir, shared_data, single, strategy):
    # each rank: 4 examples as 2 micro-batches of 2 (gradient accumulation too)
    cfg = config(tmp_path / "run", mm_dir, shared_data, micro_batch_size=2)
    cfg["distributed"] = {"strategy": strategy}
    log = torchrun(tmp_path, "sft", cfg)
    ref_log, ref_params, ref_dir = single
    for key in ("loss", "grad_norm"):  # the same objective and the same gradients, step by step
        assert [r[key] for r in log] == pytest.approx([r[key] for r in ref_log], rel=1e-5)
    assert [r["tokens"] for r in log] == [r["tokens"] for r in ref_log]
    params = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert params.keys() == ref_params.keys()
    worst = max(float((params[k] - ref_params[k]).abs().max()) for k in params)
    assert worst < 1e-6, f"{strategy}: parameters differ from the single-process run by up to {worst:.2e}"
    # the checkpoints hold the same (full, unsharded) parameter names as a single process's
    ours_ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors"))
    single_ckpt = load_file(str(ref_dir / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert ours_ckpt.keys() == single_ckpt.keys()
    assert max(float((ours_ckpt[k] - single_ckpt[k]).abs().max()) for k in ours_ckpt) < 1e-6
    moved = load_file(str(mm_dir / "model.safetensors"))
    assert any(not torch.equal(moved[k], params[k]) for k in moved)  # it did train
    if strategy == "fsdp":  # resume the sharded run from its step-2 checkpoint: step 3 comes out the same
        again = torchrun(tmp_path, "sft", cfg, "--resume", str(tmp_path / "run" / "checkpoints" / "step_0000002"))
        assert [r["loss"] for r in again] == [r["loss"] for r in log]
        params_again = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
        assert all(torch.equal(params_again[k], params[k]) for k in params)


def test_siglip_two_processes_with_gathered_texts_equal_one(tmp_path, siglip_dir, shared_data):
    """Each rank scores its 4 images against all 8 texts: the loss and update of one batch of 8."""
    sources = [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train", "format": "caption"}]

    def cfg(out):
        return run_config("siglip", out, siglip_dir, shared_data, sources, siglip={"text_length": 32},
                          optim={"lr": 2e-4}, train={"steps": STEPS, "batch_size": 8})  # fmt: skip

    single = train(cfg(tmp_path / "single"))["history"]
    two = cfg(tmp_path / "run")
    two["distributed"] = {"strategy": "ddp"}
    log = torchrun(tmp_path, "siglip", two)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in log] == pytest.approx([r[key] for r in single], rel=1e-5)
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
