"""The decode step compiled ahead of time (engine/aot.py): the eager tokens, the model's own weights (no copy),
kept on disk for later runners, and eager again (said once) when the model changes under it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from openmedgemma.engine import GenerationConfig, generate_ids
from openmedgemma.engine.fast import DecoderRunner


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 90, (n,), generator=g).tolist() for n in (19,)]


@pytest.mark.parametrize("change", ["layer", "weight storage"])
def test_compiled_once_kept_on_disk_and_eager_once_the_model_changes(ours_text, tmp_path, monkeypatch, capsys, change):
    monkeypatch.setenv("OPENMEDGEMMA_CACHE", str(tmp_path))
    config = GenerationConfig(max_new_tokens=12)
    model = copy.deepcopy(ours_text)
    lm = model.language_model
    first = DecoderRunner(lm, compile=True)
    expected = generate_ids(model, _prompts(), None, config)
    assert generate_ids(model, _prompts(), None, config, fast=first) == expected
    assert first.compiled_by == "aot" and "compiling the decode step ahead of time" in capsys.readouterr().err
    assert len(list((tmp_path / "aoti").glob("decode-step-*.pt2"))) == 1

    # a second runner (another process would do the same) loads the package: no compiling
    again = copy.deepcopy(ours_text)
    second = DecoderRunner(again.language_model, compile=True)
    assert generate_ids(again, _prompts(), None, config, fast=second) == expected
    assert second.compiled_by == "aot" and "compiling" not in capsys.readouterr().err

    # the model is checked once per generation (the first step over a new cache), not on every step
    checks = []
    real = first._aot.snapshot.unchanged
    first._aot.snapshot.unchanged = lambda: checks.append(1) or real()
    assert generate_ids(model, _prompts(), None, config, fast=first) == expected and len(checks) == 1

    # the step reads the model's own tensors: an in-place change is seen (eager gives the same tokens)
    with torch.no_grad():
        for layer in lm.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
    changed = generate_ids(model, _prompts(), None, config)
    assert changed != expected
    assert generate_ids(model, _prompts(), None, config, fast=first) == changed and first.compiled_by == "aot"

    # a replaced layer or weight storage: said once, then eager steps with the new numbers
    if change == "layer":
        layer = lm.layers[1].mlp  # down_proj: narrow, so no re-layout moves other weights (that is checked too)
        layer.down_proj = nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False)
    else:
        weight = lm.layers[1].mlp.down_proj.weight
        weight.data = torch.randn(weight.shape) * 0.3
    replaced = generate_ids(model, _prompts(), None, config)
    assert replaced != changed
    assert generate_ids(model, _prompts(), None, config, fast=first) == replaced
    assert generate_ids(model, _prompts(), None, config, fast=first) == replaced
    assert capsys.readouterr().err.count("the model changed since its decode step was compiled") == 1
    assert first.compiled_by is None and first._aot.stale


def test_a_step_that_cannot_be_exported_is_compiled_by_torch_compile(ours_text, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent branch")

    monkeypatch.setattr(torch.export, "export", refuse)
    model = copy.deepcopy(ours_text)
    config = GenerationConfig(max_new_tokens=6)
    decoder = DecoderRunner(model.language_model, compile=True)
    expected = generate_ids(model, _prompts(), None, config)
    assert generate_ids(model, _prompts(), None, config, fast=decoder) == expected
    assert decoder.compiled_by == "torch.compile"
    err = capsys.readouterr().err
    assert "compiled with torch.compile instead of ahead of time (torch.export: RuntimeError: data-dependent" in err


def test_a_damaged_package_is_compiled_by_torch_compile_and_built_anew_next_time(ours_text, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setenv("OPENMEDGEMMA_CACHE", str(tmp_path))
    model = copy.deepcopy(ours_text)
    config = GenerationConfig(max_new_tokens=6)
    expected = generate_ids(model, _prompts(), None, config)
    assert generate_ids(model, _prompts(), None, config, fast=DecoderRunner(model.language_model, compile=True)) == expected
    (package,) = (tmp_path / "aoti").glob("decode-step-*.pt2")
    package.write_bytes(b"not a zip archive")
    capsys.readouterr()
    decoder = DecoderRunner(model.language_model, compile=True)
    assert generate_ids(model, _prompts(), None, config, fast=decoder) == expected
    assert decoder.compiled_by == "torch.compile" and not package.exists()
    assert f"instead of ahead of time ({package}: " in capsys.readouterr().err


def test_fp32_step_runs_each_group_as_one_blas_call_over_the_threads(ours_text, tmp_path, monkeypatch):
    """What makes the compiled fp32 step at least as fast as the eager one: the exported graph has the engine's
    matmuls (each group's re-laid-out buffer, split over the threads), not the layers' own linears, and
    inductor keeps them as BLAS calls (it turns a 1-row bmm into its own, slower, loop)."""
    import zipfile

    monkeypatch.setenv("OPENMEDGEMMA_CACHE", str(tmp_path))
    programs = []
    real = torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, **kw: programs.append(program) or real(program, **kw))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = copy.deepcopy(ours_text)
        config = GenerationConfig(max_new_tokens=6)
        expected = generate_ids(model, _prompts(), None, config)
        decoder = DecoderRunner(model.language_model, compile=True)
        assert generate_ids(model, _prompts(), None, config, fast=decoder) == expected
    finally:
        torch.set_num_threads(threads)
    assert decoder.compiled_by == "aot"
    code = programs[0].graph_module.code
    layers = len(model.language_model.layers)
    assert "aten.linear" not in code and code.count("aten.baddbmm") == 4 * layers  # q k v, o, gate up, down
    (package,) = (tmp_path / "aoti").glob("decode-step-*.pt2")
    with zipfile.ZipFile(package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
    assert wrapper.count("aoti_torch_cpu_baddbmm_out(") == 4 * layers


def test_layers_that_cannot_be_traced_run_the_decode_step_uncompiled(ours_text, capsys):
    """int8-dynamic: export refuses fbgemm's packed weights and dynamo would break the graph at every layer
    (slower than eager), so the step runs eagerly, said once: same tokens, nothing compiled."""
    from openmedgemma.engine import quantize

    model = copy.deepcopy(ours_text)
    quantize(model, "int8-dynamic")
    config = GenerationConfig(max_new_tokens=6)
    expected = generate_ids(model, _prompts(), None, config)
    decoder = DecoderRunner(model.language_model, compile=True)
    assert generate_ids(model, _prompts(), None, config, fast=decoder) == expected
    assert generate_ids(model, _prompts(), None, config, fast=decoder) == expected
    assert decoder.compiled_by is None and decoder._compiled is None
    err = capsys.readouterr().err
    assert err.count("the decode step runs uncompiled: its layers cannot be traced (torch.export: ") == 1
