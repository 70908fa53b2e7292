"""The engine's weight re-layout, fused-matmul kernels and compiled decode step: the numbers of the model's modules."""

from __future__ import annotations

import copy

import pytest
import torch

from openmedgemma.engine import Engine, GenerationConfig, generate_ids
from openmedgemma.engine.fast import DecoderRunner, GroupedLayers, fused_buffer, relayout_weights
from openmedgemma.errors import OpenMedGemmaError
from tests.ci import in_ci


def _fresh(model):
    """A copy of `model` with every weight in its own contiguous row-major tensor (as loaded)."""
    model = copy.deepcopy(model)
    for p in model.language_model.parameters():
        p.data = p.data.clone().contiguous()
    return model


def test_relayout_keeps_values_shapes_and_the_state_dict(ours_text, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _fresh(ours_text)
    lm = model.language_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    relayout_weights(lm)
    relayout_weights(lm)  # idempotent
    attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
    assert not attn.q_proj.weight.is_contiguous()  # a view into the group's [K, sum N] buffer
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():  # same values, official layout, each its own contiguous tensor
        assert torch.equal(after[key], value) and after[key].is_contiguous(), key
    save_file(after, tmp_path / "model.safetensors")  # refuses views and shared memory
    assert all(torch.equal(t, before[k]) for k, t in load_file(tmp_path / "model.safetensors").items())
    qkv = fused_buffer((attn.q_proj, attn.k_proj, attn.v_proj))
    assert qkv is not None and qkv.is_contiguous()
    h = torch.randn(2, qkv.shape[0])
    torch.testing.assert_close(h @ qkv, torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], 1))
    assert fused_buffer((mlp.gate_proj, mlp.up_proj)) is not None
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().contiguous())
    assert fused_buffer((attn.q_proj, attn.k_proj, attn.v_proj)) is None  # no longer one buffer


@pytest.mark.parametrize("prepack", [False, True], ids=["relayout", "relayout+prepack"])
def test_kernels_step_aside_for_replaced_layers_and_see_training(ours_text, prepack):
    """The installed fused matmuls give the modules' numbers, and stop being used the moment a layer is replaced
    (an adapter, a quantized layer, new data); weights trained in place are seen (the prepacked copy remade)."""
    model = _fresh(ours_text)
    lm = model.language_model
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(3))

    def hidden():
        with torch.no_grad():
            x = lm.embed(ids)
            positions = torch.arange(7)[None].expand(2, -1)
            return lm(x, positions, _causal(lm, 7))

    expected = hidden()  # no kernels yet: the modules as they are
    DecoderRunner(lm, prepack=prepack)
    attn = lm.layers[0].self_attn
    assert attn.qkv_kernel is not None and lm.layers[0].mlp.gate_up_kernel is not None
    torch.testing.assert_close(hidden(), expected, atol=1e-5, rtol=1e-5)

    class Doubled(torch.nn.Module):  # what an adapter does: the same layer plus something
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    attn.v_proj = Doubled(attn.v_proj)
    changed = hidden()
    assert not torch.allclose(changed, expected)
    reference = _fresh(model)  # the same modules with no kernels at all
    for layer in reference.language_model.layers:
        layer.self_attn.qkv_kernel = layer.self_attn.o_kernel = None
        layer.mlp.gate_up_kernel = layer.mlp.down_kernel = None
    lm_ref = reference.language_model
    with torch.no_grad():
        want = lm_ref(lm_ref.embed(ids), torch.arange(7)[None].expand(2, -1), _causal(lm_ref, 7))
    torch.testing.assert_close(changed, want, atol=1e-5, rtol=1e-5)
    attn.v_proj = attn.v_proj.inner

    with torch.no_grad():  # training in place (an optimizer step): the next forward sees it
        lm.layers[1].mlp.up_proj.weight.mul_(0.5)
    trained = hidden()
    for layer in lm.layers:
        layer.self_attn.qkv_kernel = layer.self_attn.o_kernel = None
        layer.mlp.gate_up_kernel = layer.mlp.down_kernel = None
    torch.testing.assert_close(trained, hidden(), atol=1e-5, rtol=1e-5)


def _causal(lm, t):
    from openmedgemma.config import FULL, SLIDING

    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    window = lm.config.sliding_window
    sliding = mask & (torch.arange(t)[:, None] - torch.arange(t)[None] < window)[None, None]
    return {FULL: mask, SLIDING: sliding}


@pytest.mark.parametrize("backend", [True, "dynamo"], ids=["aot", "torch.compile"])
@pytest.mark.parametrize("rows", [1, 2], ids=["one-prompt", "left-padded-batch"])
def test_compiled_decode_gives_the_eager_tokens(ours_text, rows, backend):
    """compile=True (on the CPU: exported and compiled ahead of time) and compile="dynamo" (torch.compile)
    against the uncompiled decoder, greedy: one prompt, and a left-padded batch (the masked path)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (21, 13)][:rows]
    config = GenerationConfig(max_new_tokens=20)
    decoder = DecoderRunner(ours_text.language_model, compile=backend)
    expected = generate_ids(ours_text, prompts, None, config)
    assert generate_ids(ours_text, prompts, None, config, fast=decoder) == expected
    assert decoder.compiled_by == ("aot" if backend is True else "torch.compile")
    assert (decoder._compiled is None) == (backend is True) and decoder.compile_seconds > 0


def test_compile_needs_the_fast_decoder(ours_text, engine):
    with pytest.raises(OpenMedGemmaError, match="needs fast=True"):
        Engine(engine.model, engine.tokenizer, fast=False, compile=True)


def _compiled_quantized(ours_text, mode: str, prompt_len: int, seed: int, backend: bool | str = True):
    """A `mode`-quantized copy compiled (DecoderRunner(compile=True)): its compiled greedy tokens are the eager
    ones, with no graph break. Returns (model, decoder, run) with run() -> the tokens through the decoder."""
    from torch._dynamo.utils import counters

    from openmedgemma.engine import quantize

    model = copy.deepcopy(ours_text)
    quantize(model, mode)
    prompts = [torch.randint(3, 90, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()]
    config = GenerationConfig(max_new_tokens=10)
    expected = generate_ids(model, prompts, None, config)
    decoder = DecoderRunner(model.language_model, compile=backend)
    counters.clear()
    assert generate_ids(model, prompts, None, config, fast=decoder) == expected  # compiles
    assert not counters["graph_break"], dict(counters["graph_break"])
    return model, decoder, lambda: generate_ids(model, prompts, None, config, fast=decoder) == expected


def test_compiled_decode_runs_the_int8_kernel(ours_text):
    """An int8 model (on CPU, its linears call the native kernel, a custom op) compiles without graph breaks
    in the decode step and gives the eager int8 tokens."""
    from openmedgemma.engine import native

    model, decoder, _ = _compiled_quantized(ours_text, "int8", 17, 2, "dynamo")
    assert decoder.compiled_by == "torch.compile"
    # the kernel packs its weights in blocks; where it is missing the check is skipped, but never in CI
    assert native.int8_gemv_available() or not in_ci(), "the int8 CPU kernel did not build in CI"
    if native.int8_gemv_available():
        assert model.language_model.layers[0].mlp.up_proj.weight_int8.dim() == 3  # the kernel's blocks


# ------------------------------------------------------------------ quantized groups in one kernel call

GROUP_MODES = ["int4", "int8", "bf16", "fp16"]
GROUP_OPS = {"int4": "int4_gemv_group", "int8": "int8_gemv_group", "bf16": "half_gemv_group", "fp16": "half_gemv_group"}


@pytest.mark.parametrize("mode", GROUP_MODES)
def test_a_group_in_one_call_equals_each_layer_alone(kernel, mode):
    """`group_forward` (one kernel call over q, k, v-like layers: output widths 40, 33, 64, so blocks of 32 do not
    line up with the layers) gives exactly the layers' own outputs side by side, for 1 and 3 rows; prefill rows go
    back to the layers (None) where the kernel is for decode only."""
    from openmedgemma.engine.quant import LAYERS

    gen = torch.Generator().manual_seed(0)
    layers = tuple(LAYERS[mode](torch.randn(n, 70, generator=gen), mode) for n in (40, 33, 64))
    for rows in (1, 3):
        x = torch.randn(2, rows, 70, generator=gen)
        y = type(layers[0]).group_forward(layers, x)
        assert y is not None and y.shape == (2, rows, 137)
        assert torch.equal(y, torch.cat([m(x) for m in layers], -1))
    many = torch.randn(1, 40, 70, generator=gen)
    y = type(layers[0]).group_forward(layers, many)
    if mode == "int4":  # its kernel runs prefill too
        assert torch.equal(y, torch.cat([m(many) for m in layers], -1))
    else:
        assert y is None


def test_group_ops_refuse_mismatched_lists_and_widths(kernel):
    from openmedgemma.engine.half import HalfLinear
    from openmedgemma.engine.int4 import Int4Linear
    from openmedgemma.engine.quant import Int8Linear

    ops = torch.ops.openmedgemma
    a, b = Int4Linear(torch.randn(32, 64)), Int4Linear(torch.randn(32, 96))
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="same, non-zero length"):
        ops.int4_gemv_group(x, [a.weight_int4], [a.scale, a.scale], [32, 32])
    with pytest.raises(RuntimeError, match="x has 64 columns but w has 3 groups"):
        ops.int4_gemv_group(x, [a.weight_int4, b.weight_int4], [a.scale, b.scale], [32, 32])
    c = Int8Linear(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="same, non-zero length"):
        ops.int8_gemv_group(x, [], [], [])
    with pytest.raises(RuntimeError, match="scale must be contiguous fp32"):
        ops.int8_gemv_group(x, [c.weight_int8, c.weight_int8], [c.scale, c.scale[:5]], [32, 32])
    h, f = HalfLinear(torch.randn(32, 64), "bf16"), HalfLinear(torch.randn(32, 64), "fp16")
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.half_gemv_group(x, [h.weight_half, f.weight_half], [32, 32], "avx2")
    for op, args in ((ops.int4_gemv_group, (x, [a.weight_int4, a.weight_int4], [a.scale, a.scale], [32, 20])),
                     (ops.int8_gemv_group, (x, [c.weight_int8, c.weight_int8], [c.scale, c.scale], [32, 32])),
                     (ops.half_gemv_group, (x, [h.weight_half, h.weight_half], [32, 32], "avx2"))):  # fmt: skip
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("mode", GROUP_MODES)
def test_quantized_groups_run_as_one_call_and_step_aside_when_replaced(ours_text, kernel, mode):
    """The engine puts a `GroupedLayers` on q/k/v and gate/up of a quantized model: same hidden states as the
    layers one by one, one kernel call per group, and the layers run alone again once one is replaced."""
    from openmedgemma.engine import quantize

    model = copy.deepcopy(ours_text)
    quantize(model, mode)
    lm = model.language_model
    ids = torch.randint(3, 90, (2, 1), generator=torch.Generator().manual_seed(5))

    def hidden():
        with torch.no_grad():
            return lm(lm.embed(ids), torch.full((2, 1), 0), _causal(lm, 1))

    expected = hidden()  # no kernels: each layer alone
    DecoderRunner(lm)
    attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
    assert isinstance(attn.qkv_kernel, GroupedLayers) and isinstance(mlp.gate_up_kernel, GroupedLayers)
    assert attn.o_kernel is None and mlp.down_kernel is None  # one layer: nothing to group
    calls = []
    real = GroupedLayers.__call__
    GroupedLayers.__call__ = lambda self, x: calls.append(self) or real(self, x)
    try:  # close, not equal: the runner's norm kernel sums squares in another order (groups alone: exact, above)
        torch.testing.assert_close(hidden(), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2 * len(lm.layers)
        attn.v_proj = type(attn.v_proj)(torch.randn(attn.v_proj.out_features, attn.v_proj.in_features), mode)
        changed = hidden()
    finally:
        GroupedLayers.__call__ = real
    for layer in lm.layers:
        layer.self_attn.qkv_kernel = layer.mlp.gate_up_kernel = None
    assert not torch.allclose(changed, expected, rtol=1e-3, atol=1e-3) and torch.equal(changed, hidden())


def test_compiled_int4_decode_runs_one_call_per_group(ours_text, kernel):
    """The step compiled ahead of time runs the grouped kernel: per layer, one call for q/k/v, one for gate/up,
    one each for o and down, and gives the eager int4 tokens."""
    from torch.profiler import profile

    model, decoder, run = _compiled_quantized(ours_text, "int4", 15, 4)
    assert decoder.compiled_by == "aot"
    with profile() as prof:
        assert run()
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = len(model.language_model.layers)
    steps = 10  # the prefill and 9 decode steps (the 10th token needs no forward)
    assert calls.get("openmedgemma::int4_gemv_group") == 2 * layers * steps, calls
    assert calls.get("openmedgemma::int4_gemv") == 2 * layers * steps, calls


def test_each_compiled_runner_keeps_its_own_compiled_code(ours_text):
    """dynamo keeps compiled code per code object and runs a frame eagerly once `recompile_limit` entries exist:
    a second compiled runner (another model) must still run compiled, not fall back because the first filled the
    cache (limit 1 here; 8 by default, reached by a benchmark that compiles 5 formats in one process)."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    from openmedgemma.engine import quantize

    prompts = [torch.randint(3, 90, (9,), generator=torch.Generator().manual_seed(6)).tolist()]
    config = GenerationConfig(max_new_tokens=4)
    quantized = copy.deepcopy(ours_text)
    quantize(quantized, "int8")
    with torch._dynamo.config.patch(recompile_limit=1):
        counters.clear()
        for model in (copy.deepcopy(ours_text), quantized):
            decoder = DecoderRunner(model.language_model, compile="dynamo")
            expected = generate_ids(model, prompts, None, config)
            assert generate_ids(model, prompts, None, config, fast=decoder) == expected
            with profile() as prof:
                generate_ids(model, prompts, None, config, fast=decoder)
            assert any("Torch-Compiled Region" in e.key for e in prof.key_averages()), "ran eagerly"
        assert not counters["recompile_limit"] and not counters["cache_size_limit"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_activation_kernels_on_quantized_cpu_decoders_only(ours_text, dtype):
    """A quantized decoder on the CPU (its layers run the native library), fp32 or bf16 (a model loaded in bf16,
    as the 4b is), gets the one-op norm on every RMSNorm and the one-op gelu(gate) * up on every MLP: the torch
    ops' numbers (to the order of a sum in fp32; bf16 to a unit in the last place here and there), one call per
    norm and per MLP, none with autograd. A plain decoder keeps the torch ops (it never waits for the library's
    build); `remove_kernels` takes them off."""
    from openmedgemma.engine import native, quantize
    from openmedgemma.engine.fast import _norms, remove_kernels

    plain = copy.deepcopy(ours_text).to(dtype)
    DecoderRunner(plain.language_model)
    assert all(n.fused is None for n in _norms(plain.language_model))
    assert all(layer.mlp.act is None for layer in plain.language_model.layers)
    model = copy.deepcopy(ours_text).to(dtype)
    quantize(model, "int4")
    lm = model.language_model
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(8))

    def hidden():
        return lm(lm.embed(ids), torch.arange(6)[None], _causal(lm, 6))

    with torch.no_grad():
        expected = hidden()
    DecoderRunner(lm)
    if not native.int8_gemv_available():
        assert not in_ci(), "the CPU kernels did not build in CI"
        return
    norms = list(_norms(lm))
    assert len(norms) == 6 * len(lm.layers) + 1
    assert all(n.fused is native.rms_norm for n in norms)
    assert all(layer.mlp.act is native.gelu_tanh_mul for layer in lm.layers)
    calls = []
    for n in norms:
        n.fused = lambda x, gain, eps: calls.append("norm") or native.rms_norm(x, gain, eps)
    for layer in lm.layers:
        layer.mlp.act = lambda gate_up: calls.append("act") or native.gelu_tanh_mul(gate_up)
    with torch.no_grad():
        got = hidden()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # bf16 roundings that differ in the last place, carried through the layers
        torch.testing.assert_close(got, expected, rtol=2**-6, atol=2**-6)
        assert (got != expected).float().mean() < 0.02
    assert calls.count("norm") == 5 * len(lm.layers) + 1  # q_norm norms k too
    assert calls.count("act") == len(lm.layers)
    calls.clear()
    hidden()  # autograd on: the reference's own ops
    assert not calls
    remove_kernels(lm)
    assert all(n.fused is None for n in norms) and all(layer.mlp.act is None for layer in lm.layers)


def test_decode_attention_kernel_gives_the_sdpa_tokens(ours_text):
    """A quantized CPU fp32 decoder attends through `native.decode_attention` at decode (one call per layer per
    step, none at prefill), with the tokens SDPA gives, over a left-padded batch whose sliding layers wrap their
    ring; so does a quantized bf16 one; a plain fp32 and a plain bf16 decoder keep SDPA; `remove_kernels` takes
    it off."""
    from openmedgemma.engine import native, quantize
    from openmedgemma.engine.fast import remove_kernels

    plain = copy.deepcopy(ours_text)
    DecoderRunner(plain.language_model)
    assert all(layer.self_attn.attend is None for layer in plain.language_model.layers)
    model = copy.deepcopy(ours_text)
    quantize(model, "int4")
    lm = model.language_model
    decoder = DecoderRunner(lm)
    if not native.int8_gemv_available():
        assert not in_ci(), "the CPU kernels did not build in CI"
        return
    assert all(layer.self_attn.attend is native.decode_attention for layer in lm.layers)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (lm.config.sliding_window + 5, 5)]
    config = GenerationConfig(max_new_tokens=12)
    calls = []
    for layer in lm.layers:
        layer.self_attn.attend = lambda *a: calls.append(a[0].shape) or native.decode_attention(*a)
    got = generate_ids(model, prompts, None, config, fast=decoder)
    assert len(calls) == 11 * len(lm.layers) and all(shape == (2, lm.config.num_attention_heads, 1, lm.config.head_dim)
                                                     for shape in calls)  # fmt: skip
    for layer in lm.layers:
        layer.self_attn.attend = None
    assert got == generate_ids(model, prompts, None, config, fast=decoder)
    DecoderRunner(lm)
    remove_kernels(lm)
    assert all(layer.self_attn.attend is None for layer in lm.layers)
    half = copy.deepcopy(ours_text).to(torch.bfloat16)  # bf16 (as the 4b is loaded): its bf16 cache, read widened
    quantize(half, "int4")
    decoder = DecoderRunner(half.language_model)
    assert all(layer.self_attn.attend is native.decode_attention for layer in half.language_model.layers)
    got = generate_ids(half, prompts, None, config, fast=decoder)
    for layer in half.language_model.layers:
        layer.self_attn.attend = None
    assert got == generate_ids(half, prompts, None, config, fast=decoder)
    bf16 = copy.deepcopy(ours_text).to(torch.bfloat16)  # not quantized: the native library is not waited for
    DecoderRunner(bf16.language_model)
    assert all(layer.self_attn.attend is None for layer in bf16.language_model.layers)


# ------------------------------------------------------------------ fp32 decode rows over the threads


def test_split_matmul_equals_one_matmul():
    from openmedgemma.engine.fast import split_matmul

    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 3, 64, generator=g), torch.randn(96, 64, generator=g)
    want = x @ w.T
    torch.testing.assert_close(split_matmul(x, w, 2, columns=False), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(split_matmul(x, w.t().contiguous(), 4, columns=True), want, rtol=1e-6, atol=1e-5)
    assert split_matmul(x, w, 5, columns=False) is None  # 96 outputs do not split in 5
    assert split_matmul(x, w.t(), 2, columns=False) is None  # not row-major: the caller runs one matmul


def test_fp32_decode_rows_split_over_the_threads_give_the_same_tokens(ours_text, monkeypatch):
    """With 2 threads every fp32 decode-row matmul of the decoder (q/k/v, o, gate/up, down) and the tied head run
    as a batch of column blocks; greedy tokens are those of the single matmuls."""
    from openmedgemma.engine import fast

    model = copy.deepcopy(ours_text)
    lm = model.language_model
    decoder = DecoderRunner(lm)
    prompts = [torch.randint(3, 90, (11,), generator=torch.Generator().manual_seed(12)).tolist()]
    config = GenerationConfig(max_new_tokens=8)
    calls = []
    real = fast.split_matmul
    monkeypatch.setattr(fast, "split_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = generate_ids(model, prompts, None, config, fast=decoder)
        assert len(calls) == 7 * 4 * len(lm.layers) + 8  # 7 decode steps of 4 groups per layer; 8 heads (prefill too)
        monkeypatch.setattr(fast, "SPLIT_MAX_ROWS", 0)
        calls.clear()
        assert generate_ids(model, prompts, None, config, fast=decoder) == split and not calls
    finally:
        torch.set_num_threads(threads)
