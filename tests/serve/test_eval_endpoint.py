"""`openmedgemma eval --endpoint` against our live server gives the in-process engine's numbers."""

from __future__ import annotations

import json

import pytest

from openmedgemma.cli import main


def predictions(folder) -> list[dict]:
    lines = folder.read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]  # after the header


@pytest.mark.parametrize("task", ["medqa", "vqa-rad"])
def test_endpoint_eval_equals_in_process(server, shared_data, tmp_path, task, capsys):
    common = [task, "--limit", "20", "--data-dir", str(shared_data), "--no-progress", "--n-boot", "200"]
    assert main(["eval", *common, "--endpoint", server.api, "--concurrency", "8", "--out", str(tmp_path / "e")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "local")]) == 0
    remote = json.loads((tmp_path / "e" / "medgemma-nano" / f"{task}.json").read_text())
    local = json.loads((tmp_path / "local" / "medgemma-nano" / f"{task}.json").read_text())
    assert remote["metrics"] == local["metrics"] and remote["counts"] == local["counts"]
    got = predictions(tmp_path / "e" / "medgemma-nano" / task / "predictions.jsonl")
    want = predictions(tmp_path / "local" / "medgemma-nano" / task / "predictions.jsonl")
    assert [p["output"] for p in got] == [p["output"] for p in want] and len(got) == 20
    if task == "vqa-rad":
        assert len({p["output"] for p in got}) > 1  # varied answers, so the comparison can fail


def test_unreachable_endpoint_is_one_clear_error():
    from openmedgemma.eval.endpoint import EndpointError, OpenAIChatModel

    with pytest.raises(EndpointError, match=r"http://127.0.0.1:9/v1: cannot connect"):
        OpenAIChatModel("http://127.0.0.1:9/v1")
