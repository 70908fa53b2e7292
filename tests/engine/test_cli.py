"""`openmedgemma ask` and `openmedgemma chat` end to end on a tiny checkpoint folder with a tokenizer.

The commands run through the top-level CLI's `main` (which prints user errors as one line with exit
status 2), so a lost registration fails here; chat is driven through piped stdin and through a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from openmedgemma.cli import main
from openmedgemma.engine import GenerationConfig

@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cxr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)).save(path)
    return path


def test_help_does_not_import_torch():
    code = ("import sys; from openmedgemma.engine import cli; import argparse; p = argparse.ArgumentParser(); "
            "cli.register(p.add_subparsers()); assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ask_prints_the_answer(chat_dir, engine, png, capsys):
    assert main(["ask", "--model", str(chat_dir), "--max-new-tokens", "12", "What is this?"]) == 0
    out = capsys.readouterr().out
    assert out == engine.chat("What is this?", max_new_tokens=12) + "\n"

    messages = [_user("Findings?", png)]
    expected = engine.generate([messages], GenerationConfig(max_new_tokens=12))[0].text
    argv = ["ask", "--model", str(chat_dir), "--image", str(png), "--max-new-tokens", "12", "--stream", "Findings?"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_ask_json(chat_dir, png, capsys):
    argv = ["ask", "--model", str(chat_dir), "--image", str(png), "--max-new-tokens", "7", "--json",
            "--system", "Be brief.", "Q?"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"answer", "prompt_tokens", "new_tokens", "stop_reason", "timings"}
    assert data["prompt_tokens"] > 16 and 1 <= data["new_tokens"] <= 7
    assert data["timings"]["time_to_first_token_seconds"] > 0


def test_ask_with_prompt_lookup_gives_the_same_answer(chat_dir, capsys):
    question = "Rewrite: The heart size is normal. No acute cardiopulmonary process. The heart size is normal."
    answers = []
    for extra in ([], ["--prompt-lookup", "5", "--prompt-lookup-ngram", "2"]):
        assert main(["ask", "--model", str(chat_dir), "--max-new-tokens", "24", "--json", *extra, question]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1]
    from openmedgemma.engine import cli

    parser = __import__("argparse").ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    config = cli._config(parser.parse_args(["ask", "--prompt-lookup", "7", "--prompt-lookup-ngram", "2", "Q?"]))
    assert (config.prompt_lookup_tokens, config.prompt_lookup_ngram) == (7, 2)


def test_ask_compile_gives_the_same_answer_through_the_compiled_step(chat_dir, capsys, monkeypatch):
    from openmedgemma.engine.aot import AotDecodeStep

    steps = []
    real = AotDecodeStep.__call__
    monkeypatch.setattr(AotDecodeStep, "__call__", lambda self, *a: steps.append(1) or real(self, *a))
    question = "What does a normal chest X-ray show?"
    answers = []
    for extra in ([], ["--compile"]):
        steps.clear()
        base = ["ask", "--model", str(chat_dir), "--quantize", "int4", "--max-new-tokens", "12", "--json"]
        assert main([*base, *extra, question]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
        assert bool(steps) == bool(extra)  # compiled steps (ahead of time on the CPU) iff asked
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "nowhere/missing.png"], "nowhere/missing.png: file not found"),
        (["--model", "no/such/folder"], "no/such/folder: no such file or folder"),
        (["--prompt-lookup", "-1"], "prompt_lookup_tokens must be an integer >= 0, got -1"),
    ],
)
def test_user_errors_are_one_line_with_status_2(chat_dir, extra, message, capsys):
    argv = ["ask", "--model", str(chat_dir), *extra, "Q?"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("openmedgemma ask: error:")


def test_model_folder_without_config_or_unreadable(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["ask", "--model", str(tmp_path / "empty"), "Q?"]) == 2
    assert "no config.json" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "config.json").write_text("{not json")
    assert main(["chat", "--model", str(locked)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err


def test_chat_from_piped_stdin_keeps_history(chat_dir, engine, png, monkeypatch, capsys):
    lines = [f"/image {png}", "What is this?", "And now?", "/image missing.png", "/reset", "Hello", "/quit",
             "never read"]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", _Lines(lines))
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    answers = captured.out.splitlines()
    config = GenerationConfig(max_new_tokens=6)
    first = [_user("What is this?", png)]
    a1 = engine.generate([first], config)[0].text
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And now?"}]
    a2 = engine.generate([second], config)[0].text
    a3 = engine.generate([[{"role": "user", "content": "Hello"}]], config)[0].text
    assert answers == [a1, a2, a3]
    assert "missing.png: file not found" in captured.err and "conversation reset" in captured.err


def test_chat_in_a_terminal(chat_dir, tmp_path):
    """An interactive session on a pseudo-terminal: prompt, answer, /quit."""
    pty = pytest.importorskip("pty")
    code = "import sys; from openmedgemma import cli; sys.exit(cli.main(sys.argv[1:]))"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code, "chat", "--model", str(chat_dir), "--max-new-tokens", "4"],
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)  # fmt: skip
    os.close(follower)
    try:
        out = _read_until(leader, b">>> ", 120)
        os.write(leader, b"Hello\n")
        out += _read_until(leader, b">>> ", 120)
        os.write(leader, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
    assert out.count(b">>> ") == 2 and b"/reset" in out


def _user(text, image):
    return {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}


class _Lines:
    def __init__(self, lines):
        self.lines = [line + "\n" for line in lines]

    def isatty(self):
        return False

    def readline(self):
        return self.lines.pop(0) if self.lines else ""


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {data[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other side closed
            break
        data += chunk
    return data


def test_ask_about_a_dicom_file(chat_dir, shared_data, capsys):
    dicom = next((shared_data / "dicom").rglob("*.dcm"))
    assert main(["ask", "--model", str(chat_dir), "--image", str(dicom), "--max-new-tokens", "4", "--json", "Q?"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 16  # the image's soft tokens are in the prompt


def test_ask_quantize_takes_every_mode_and_names_them_on_a_bad_one(chat_dir, capsys):
    from openmedgemma.engine.quant import MODES

    argv = ["ask", "--model", str(chat_dir), "--max-new-tokens", "3", "--quantize", "bf16", "Q?"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("openmedgemma: bf16 weights") == 1 and "decode:" in err
    assert main(["ask", "--model", str(chat_dir), "--quantize", "q3", "Q?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--quantize q3: unknown weight format; use one of {', '.join(MODES)} or none" in err
    assert main(["ask", "--model", str(chat_dir), "--int8", "--quantize", "fp16", "Q?"]) == 2
    assert "--int8 and --quantize fp16 disagree" in capsys.readouterr().err


def test_a_bf16_model_on_the_cpu_runs_the_16_bit_layers_unless_told_none(chat_dir, capsys):
    """torch's 1-row bf16 linear decodes slower than fp32 even with native bf16; the engine's 16-bit layers hold the
    same bytes and stream them ~2.5x faster, so `ask --dtype bfloat16` on a CPU takes them; --quantize none not."""
    from openmedgemma.engine.cli import bf16_default

    assert bf16_default(None, "bfloat16", "cpu") == "bf16"
    assert bf16_default(None, "bfloat16", "cuda") is None and bf16_default(None, "float32", "cpu") is None
    assert bf16_default("int4", "bfloat16", "cpu") == "int4" and bf16_default("none", "bfloat16", "cpu") is None
    base = ["ask", "--model", str(chat_dir), "--max-new-tokens", "3", "--dtype", "bfloat16", "--device", "cpu"]
    assert main([*base, "Q?"]) == 0
    assert capsys.readouterr().err.count("openmedgemma: bf16 weights") == 1
    assert main([*base, "--quantize", "none", "Q?"]) == 0
    assert "bf16 weights" not in capsys.readouterr().err
