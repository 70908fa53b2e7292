"""Loading under memory limits, each in a subprocess (resource.setrlimit there, never in the test process).

- a config.json that disagrees with the weights is refused before anything of its size is allocated;
- peak memory over a load stays at one copy of the weights (the file is mapped, not copied);
- `--dtype auto` / `float32` refuse an upcast that cannot fit, with one line naming the bytes and the options.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openmedgemma.engine import dtype as D
from openmedgemma.errors import CheckpointError
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
NANO_GEMMA, NANO_SIGLIP = ROOT / "models" / "medgemma-nano", ROOT / "models" / "medsiglip-nano"
MB = 1 << 20

# Runs in the child: imports first, then an address-space limit of (what the process maps now + EXTRA bytes),
# then the body. Prints nothing of its own on success but what the body prints.
PRELUDE = """
import resource, sys
import torch
import openmedgemma.cli, openmedgemma.engine.engine, openmedgemma.model.medgemma, openmedgemma.model.medsiglip
def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + {extra}, resource.getrlimit(resource.RLIMIT_AS)[1]))
"""


def run_limited(body: str, extra_bytes: int, timeout: float = 120) -> subprocess.CompletedProcess:
    code = PRELUDE.format(extra=int(extra_bytes)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def edit_config(src: Path, dst: Path, part: str, **values) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config[part].update(values)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------ a config that disagrees with the weights


def test_oversized_medgemma_config_is_refused_before_allocating(tmp_path):
    """hidden 65536 x intermediate 262144 would be 64 GiB per matrix: under a 2 GB allowance the command must answer
    one CheckpointError line listing the mismatched shapes, not die in the allocator."""
    bad = edit_config(NANO_GEMMA, tmp_path / "bad", "text_config", hidden_size=65536, intermediate_size=262144)
    proc = run_limited(f"sys.exit(openmedgemma.cli.main(['ask', '--model', {str(bad)!r}, 'hi']))", 2 << 30)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"openmedgemma ask: error: {bad}: the weights do not match the config.")
    assert "wrong shape: language_model.model.embed_tokens.weight (file [4096, 256], model [4096, 65536])" in proc.stderr
    assert "mlp.gate_proj.weight (file [768, 256], model [262144, 65536])" in proc.stderr


def test_oversized_medsiglip_config_is_refused_before_allocating(tmp_path):
    bad = edit_config(NANO_SIGLIP, tmp_path / "bad", "vision_config", hidden_size=65536, intermediate_size=262144)
    proc = run_limited(f"""
        from openmedgemma.errors import CheckpointError
        try:
            openmedgemma.model.medsiglip.MedSigLIP.from_pretrained({str(bad)!r})
        except CheckpointError as err:
            print(err)
            sys.exit(3)
    """, 2 << 30)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"{bad}: the weights do not match the config.")
    assert "vision_model.embeddings.patch_embedding.weight (file [128, 3, 8, 8], model [65536, 3, 8, 8])" in proc.stdout


# ------------------------------------------------------------------ a checkpoint of a few hundred MB


@pytest.fixture(scope="module")
def big_bf16(tmp_path_factory) -> Path:
    """A multimodal MedGemma of ~100 M parameters stored in bfloat16 (~200 MB), with a tokenizer."""
    from openmedgemma import MedGemma
    from openmedgemma.config import from_hf_config
    from openmedgemma.tokenizer import Tokenizer, build_tokenizer

    folder = tmp_path_factory.mktemp("big_bf16")
    build_tokenizer(folder, "compact", tiny.CHAT_CORPUS, vocab_size=tiny.CHAT_VOCAB)
    tok = Tokenizer.from_pretrained(folder)
    text = dict(vocab_size=tiny.CHAT_VOCAB, eos_token_id=[tok.eos_id, tok.end_of_turn_id], hidden_size=1024,
                intermediate_size=8192, num_hidden_layers=4)  # fmt: skip
    config = tiny.gemma_mm_hf_config(text, boi_token_index=tok.boi_id, eoi_token_index=tok.eoi_id,
                                     image_token_index=tok.image_token_id)  # fmt: skip
    model = MedGemma(from_hf_config(config)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    del model
    assert 150 * MB < (folder / "model.safetensors").stat().st_size < 300 * MB
    return folder


PEAK_BODY = """
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
model = openmedgemma.model.medgemma.MedGemma.from_pretrained({folder!r}, dtype={dtype!r})
loaded = status("VmRSS")
total = 0.0
for p in model.parameters():  # touch every weight: each mapped page is read once
    total += float(p.sum())
print(status("VmHWM") - before, loaded - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.parametrize("dtype", [None, "float32"], ids=["as-stored", "upcast"])
def test_peak_memory_over_a_load_is_one_copy_of_the_weights(big_bf16, dtype):
    """Peak RSS growth over from_pretrained + reading every weight: as stored, the mapped file once; upcast to
    float32, the float32 copy plus the file's pages (mapped while converting), never a second copy."""
    file_bytes = (big_bf16 / "model.safetensors").stat().st_size
    proc = run_limited(PEAK_BODY.format(folder=str(big_bf16), dtype=dtype), 4 << 30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown, at_load, weight_bytes = (int(v) for v in proc.stdout.split())
    bound = weight_bytes + (file_bytes if dtype else 0) + 64 * MB  # 64 MB: the interpreter's own churn
    print(f"file {file_bytes / MB:.0f} MB, weights in memory {weight_bytes / MB:.0f} MB, RSS grew {at_load / MB:.0f} MB "
          f"by the end of from_pretrained, peak {grown / MB:.0f} MB (bound {bound / MB:.0f} MB)")  # fmt: skip
    assert weight_bytes >= file_bytes * (2 if dtype else 1) * 0.95
    assert grown <= bound
    if dtype is None:  # mapped lazily: from_pretrained itself reads (almost) no weight
        assert at_load < file_bytes / 4


# ------------------------------------------------------------------ --dtype auto and upcasts


def test_cpu_flags_and_native_bf16():
    info = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    assert {"avx2", "amx_bf16"} <= D.cpu_flags(info)
    assert D.cpu_has_native_bf16({"avx2", "avx512_bf16"}) and D.cpu_has_native_bf16({"amx_bf16"})
    assert not D.cpu_has_native_bf16({"avx2", "avx512f", "fma"})


def test_auto_keeps_bf16_on_native_cpus_and_upcasts_elsewhere_when_it_fits(big_bf16):
    assert D.choose_dtype(big_bf16, "auto", "cpu", native_bf16=True, available=1 << 40) == "bfloat16"
    assert D.choose_dtype(big_bf16, "auto", "cpu", native_bf16=False, available=1 << 40) == "float32"
    assert D.choose_dtype(big_bf16, "auto", "cuda", native_bf16=False, available=0) == "bfloat16"
    assert D.choose_dtype(big_bf16, "bfloat16", "cpu", available=0) == "bfloat16"  # no upcast: nothing to check
    assert D.choose_dtype(NANO_GEMMA, "auto", "cpu", native_bf16=True, available=0) == "float32"  # a float32 file


def test_upcast_that_cannot_fit_is_refused_naming_bytes_and_options(big_bf16):
    file_bytes = (big_bf16 / "model.safetensors").stat().st_size
    for requested in ("auto", "float32"):
        with pytest.raises(CheckpointError) as err:
            D.choose_dtype(big_bf16, requested, "cpu", native_bf16=False, available=file_bytes + 100 * MB)
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(big_bf16))
        needed = float(message.split("needs ")[1].split(" GB")[0])
        assert needed == pytest.approx(2 * file_bytes / 1e9, rel=0.02)  # the float32 copy of every weight
        assert "only 0.10 GB of memory is available" in message
        assert "--dtype bfloat16" in message and "--quantize int8" in message


def test_ask_refuses_the_upcast_under_a_memory_limit_and_runs_in_bf16(big_bf16):
    """The command line, for real: an address-space allowance of the file + 300 MB cannot hold the ~400 MB float32
    copy, so `--dtype auto` on a CPU without native bf16 (and `--dtype float32` anywhere) refuses in one line before
    any upcast; `--dtype bfloat16` under the same allowance answers."""
    file_bytes = (big_bf16 / "model.safetensors").stat().st_size
    allowance = file_bytes + 300 * MB

    def ask(*flags):
        return run_limited(f"""
            from openmedgemma.engine import dtype
            dtype.cpu_has_native_bf16 = lambda flags=None: False  # as on a CPU without AMX / AVX-512-BF16
            sys.exit(openmedgemma.cli.main(['ask', '--model', {str(big_bf16)!r}, '--max-new-tokens', '2', 'hi', *{flags!r}]))
        """, allowance)  # fmt: skip

    for flags in [(), ("--dtype", "float32")]:
        proc = ask(*flags)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.startswith(f"openmedgemma ask: error: {big_bf16}: ")
        assert "needs 0.4" in proc.stderr and "--dtype bfloat16" in proc.stderr
    proc = ask("--dtype", "bfloat16", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["new_tokens"] >= 1 and result["prompt_tokens"] > 1
