"""`openmedgemma ehr ...` end to end: index, patients, questions, errors, and `ask` with the bundled nano model
(its answer is poor; the trace and the citations must be real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openmedgemma.cli import main
from openmedgemma.ehr.fhir import patient_of

ROOT = Path(__file__).resolve().parents[2]


def test_index_patients_questions(synthea_dir, tmp_path, capsys, store):
    db = tmp_path / "records.sqlite"
    assert main(["ehr", "index", str(synthea_dir), "--db", str(db), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3643 resources (25 patients)" in out and "Observation" in out
    assert main(["ehr", "patients", "--records", str(db), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == store.patients()
    out_file = tmp_path / "q.jsonl"
    assert main(["ehr", "questions", "--records", str(db), "--out", str(out_file), "--per-category", "1"]) == 0
    assert "questions" in capsys.readouterr().out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["category"] for r in rows} >= {"prescriber", "observation_value"}


def test_errors_are_one_line(index_path, tmp_path, capsys):
    assert main(["ehr", "ask", "--records", str(index_path), "--patient", "nobody", "anything?"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no patient with id 'nobody'" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["ehr", "index", str(bad), "--db", str(tmp_path / "x.sqlite"), "--no-progress"]) == 2
    assert "bad.json: not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_ask_with_the_nano_model(index_path, store):
    """The real engine: the navigator's steps run, tool calls carry real arguments, citations are retrieved ones."""
    pid = min(store.patients(), key=lambda p: len(store.search(p["id"], "MedicationRequest")) or 99)["id"]
    result = subprocess.run(
        [sys.executable, "-m", "openmedgemma.cli", "ehr", "ask", "--records", str(index_path), "--patient", pid,
         "Which medications has the patient been prescribed?", "--types", "MedicationRequest,Condition",
         "--max-new-tokens", "24", "--json"],
        capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "using the bundled medgemma-nano" in result.stderr
    answer = json.loads(result.stdout)
    steps = [e["step"] for e in answer["trace"]]
    assert steps[0] == "tool" and answer["trace"][0]["name"] == "get_patient_manifest"
    assert "select_types" in steps and "answer" in steps
    fetches = [e for e in answer["trace"] if e["step"] == "tool" and e["name"] == "get_patient_fhir_resource"]
    assert fetches and all(e["arguments"]["patient_id"] == pid for e in fetches)
    assert answer["evidence"], "the navigator read no resource"
    for ref in answer["evidence"]:  # every retrieved reference is a real resource of this patient
        resource = store.read(ref)
        assert resource is not None and patient_of(resource) == pid
    assert set(answer["citations"]) <= set(answer["evidence"])
    assert all(isinstance(e.get("reply", ""), str) for e in answer["trace"])


@pytest.mark.slow
def test_navigator_over_openmedgemma_serve_uses_native_tools(store):
    """The endpoint path for real: `openmedgemma serve` (nano) on 127.0.0.1, the lead's OpenAIChatModel, `tools`."""
    import socket
    import time
    import urllib.request

    from openmedgemma.ehr.agent import Navigator
    from openmedgemma.eval.endpoint import OpenAIChatModel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "openmedgemma.cli", "serve", "--port", str(port), "--log-level",
                               "warning"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        model = OpenAIChatModel(f"http://127.0.0.1:{port}/v1")
        pid = store.patients()[2]["id"]
        result = Navigator(model, store, max_new_tokens=16, context_tokens=2048).ask(
            pid, "Has the patient ever been diagnosed with Viral sinusitis?", types=["Condition"])
    finally:
        server.terminate()
        server.wait(30)
    native = [e for e in result.trace if e.get("native")]
    assert native, "the retrieval step did not go through the server's tools"
    assert not any("did not accept tools" in e.get("note", "") for e in result.trace)
    assert result.evidence and all(store.read(ref) is not None for ref in result.evidence)
    assert set(result.citations) <= set(result.evidence)
