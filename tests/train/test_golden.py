"""Golden losses: the first steps of SFT on VQA-RAD are pinned (CPU, fp32, one thread, seed 0).

Anything that changes what is trained on (chat format, label masking, image preprocessing, data order) or how
(forward, loss, AdamW, schedule) moves these numbers far beyond the tolerance. Tolerance: relative 1e-5 (float
summation order may differ between CPU kernels; a real change moves the first loss by > 1e-3).
Regenerate after an intended change with

    OPENMEDGEMMA_REGEN_GOLDEN=1 pytest tests/train/test_golden.py

and commit tests/train/golden_sft_losses.json with the change that explains it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.train.helpers import losses, run_config, train

GOLDEN = Path(__file__).with_name("golden_sft_losses.json")


def test_first_sft_steps_match_the_golden_losses(tmp_path, mm_dir, shared_data):
    cfg = run_config("sft", tmp_path / "run", mm_dir, shared_data, [{"kind": "vqa_rad", "path": "vqa_rad", "split": "train"}],
                     optim={"lr": 1e-3, "schedule": "linear", "warmup_steps": 2, "weight_decay": 0.01},
                     train={"steps": 6, "batch_size": 4, "micro_batch_size": 2})  # fmt: skip
    values = losses(train(cfg))
    if os.environ.get("OPENMEDGEMMA_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"sft_vqa_rad_losses": values}, indent=2) + "\n")
        pytest.skip(f"golden values regenerated in {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["sft_vqa_rad_losses"]
    assert values == pytest.approx(golden, rel=1e-5, abs=0)
