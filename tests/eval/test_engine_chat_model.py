"""`openmedgemma eval` with a real (tiny, random) MedGemma checkpoint through the engine."""

from __future__ import annotations

import json

from openmedgemma import cli
from openmedgemma.eval.chat_model import MedGemmaChatModel
from openmedgemma.eval.protocols import ChatModel
from tests import tiny


def test_engine_adapter_runs_image_and_text_tasks_end_to_end(tmp_path, shared_data, capsys):
    ckpt = tiny.chat_checkpoint(tmp_path / "tiny-medgemma")
    out = tmp_path / "results"
    argv = ["eval", "vqa-rad", "medqa", "--model", str(ckpt), "--data-dir", str(shared_data), "--out", str(out),
            "--limit", "3", "--max-new-tokens", "8", "--n-boot", "50", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    for task in ("vqa-rad", "medqa"):
        result = json.loads((out / "tiny-medgemma" / f"{task}.json").read_text())
        assert result["counts"]["n"] == 3 and result["model"] == "tiny-medgemma"
        assert result["metrics"][result["primary_metric"]]["n"] == 3
        lines = (out / "tiny-medgemma" / task / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 1 + 3  # header + one answer per example
    assert (out / "tiny-medgemma" / "summary.md").is_file()


def test_adapter_is_a_chat_model_and_greedy_is_repeatable(tmp_path):
    model = MedGemmaChatModel.from_pretrained(tiny.chat_checkpoint(tmp_path / "ckpt"))
    assert isinstance(model, ChatModel)
    batch = [[{"role": "user", "content": "Is there a pleural effusion?"}], [{"role": "user", "content": "Hi"}]]
    first = model.generate(batch, max_new_tokens=6, seed=0)
    assert len(first) == 2 and all(isinstance(a, str) for a in first)
    assert model.generate(batch, max_new_tokens=6, seed=1) == first  # greedy: the seed does not matter
