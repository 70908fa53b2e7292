"""16-bit weights (engine/half.py + half_gemv.cpp): the kernel is exact to fp32 rounding, the decode and prefill
paths agree, and bf16 / fp16 models stay close to fp32 (and "fp32", the same layers holding fp32 blocks, gives
the plain model's tokens).

Tolerances. Kernel: each output within the fp32 dot-product bound k * eps * sum |x_i w_i| of a float64
product of the same 16-bit weights. Whole models, last-position logits against fp32, relative L2 error:
bf16 (weights rounded to 8 bits of mantissa, relative error <= 2^-9 each) within 3%, fp16 (11 bits) within
0.5%, on the tiny random model (6 layers of std-0.15 weights, errors compound more than in a trained model)
and on the nano model; "fp32" (the same values in blocks) within 1e-5. Greedy agreement over 32 tokens is printed
(run with -s), not asserted: lossy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openmedgemma import MedGemma
from openmedgemma.bundled import nano_path
from openmedgemma.engine import Engine, GenerationConfig, cpu, generate_ids, half, native, quantize
from openmedgemma.engine.quant import MODES, quantized_head
from openmedgemma.errors import OpenMedGemmaError

ISAS = ["avx2", "avx512"] if cpu.detect().has("avx512") else ["avx2"]  # every variant this CPU can run
LOGITS_REL = {"bf16": 0.03, "fp16": 0.005, "fp32": 1e-5}  # fp32: the same values, summed in another order


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("n", "k", "m"), [(32, 64, 1), (45, 77, 3), (1, 1, 1), (100, 131, 8), (70, 3, 2)])
def test_kernel_is_exact_to_fp32_rounding(kernel, isa, mode, n, k, m):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen).to(half.DTYPES[mode])
    x = torch.randn(m, k, generator=gen)
    y = half.half_gemv(x, native.pack_blocks(w), n, isa)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = x.double() @ w.double().T
    bound = k * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - ref).abs() <= bound + 1e-30).all()


def test_the_variants_agree_and_threads_do_not_change_the_result(kernel):
    w, x = native.pack_blocks(torch.randn(1000, 300).bfloat16()), torch.randn(2, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [half.half_gemv(x, w, 1000, isa) for isa in ISAS]
        torch.set_num_threads(2)
        two = [half.half_gemv(x, w, 1000, isa) for isa in ISAS]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[0], one[-1], atol=1e-4, rtol=1e-5)  # same sums, another order


def test_op_is_a_well_formed_torch_op_and_compiles_without_graph_breaks(kernel):
    args = (torch.randn(2, 10), native.pack_blocks(torch.randn(40, 10).half()), 40, ISAS[-1])
    torch.library.opcheck(torch.ops.openmedgemma.half_gemv.default, args)  # schema, fake tensor, dispatch
    layer = half.HalfLinear(torch.randn(40, 10), "bf16")
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    x = torch.randn(1, 10)
    torch.testing.assert_close(compiled(x), layer(x))


def test_kernel_refuses_bad_arguments(kernel):
    w = native.pack_blocks(torch.randn(40, 8).bfloat16())
    with pytest.raises(RuntimeError, match="isa must be 'avx2' or 'avx512'"):
        half.half_gemv(torch.randn(1, 8), w, 40, "sse")
    with pytest.raises(RuntimeError, match="x has 9 columns but w has K = 8"):
        half.half_gemv(torch.randn(1, 9), w, 40, "avx2")
    with pytest.raises(RuntimeError, match="bfloat16, float16 or float32 blocks"):
        half.half_gemv(torch.randn(1, 8), w.to(torch.int8), 40, "avx2")


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_layer_holds_16_bit_weights_and_its_paths_agree(kernel, mode):
    w = torch.randn(90, 70)
    layer = half.HalfLinear(w, mode)
    assert layer.weight_half.dtype == half.DTYPES[mode]
    assert layer.weight_half.numel() * 2 <= w.numel() * 4 / 2 * 96 / 90  # half of fp32's bytes (+ block padding)
    assert torch.equal(layer.half_rows(), w.to(half.DTYPES[mode]))
    assert layer.isa == half.decode_isa(cpu.detect()) and layer.isa in layer.kernel
    exact = w.to(half.DTYPES[mode]).double()
    x = torch.randn(2, 12, 70)  # 24 rows: prefill
    prefill = layer(x)
    decode = torch.cat([layer(x[:, i : i + 1]) for i in range(12)], 1)  # one row at a time: the kernel
    assert prefill.shape == decode.shape == (2, 12, 90) and prefill.dtype == torch.float32
    ref = x.double() @ exact.T
    torch.testing.assert_close(decode.double(), ref, atol=1e-4, rtol=1e-4)
    # prefill: fp32 BLAS, or on native-bf16 CPUs a bf16 GEMM with the activations rounded to bf16 as well (each
    # by at most 2^-8 relative): bounded by 2^-8 sum_k |x_k w_k| (+ fp32 sums), not by a fixed tolerance, which
    # random inputs exceed now and then
    if layer.bf16_gemm:
        bound = (x.double().abs() @ exact.abs().T) * 2**-8 * 1.01 + 1e-5
        assert ((prefill.double() - ref).abs() <= bound).all()
    else:
        torch.testing.assert_close(prefill.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.dense_matmul(x.reshape(-1, 70), torch.float32).double(), ref.reshape(-1, 90),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_fp32_blocks_hold_the_same_values_and_both_paths_equal_the_linear(kernel, ours_text):
    """quantize(model, "fp32") only re-lays the weights out in the decode kernel's blocks: the layer holds the
    fp32 values exactly, decode (the kernel) and prefill (the blocks GEMM) match F.linear to fp32 rounding,
    no second head table is made, and the model's greedy tokens are the plain model's."""
    w = torch.randn(90, 70)
    layer = half.HalfLinear(w, "fp32")
    assert layer.weight_half.shape == (3, 70, 32) and torch.equal(layer.half_rows(), w)
    assert "fp32 blocks" in layer.kernel and "prefill: blocks GEMM" in layer.kernel
    x = torch.randn(2, 12, 70)
    ref = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)  # 24 rows: prefill
    torch.testing.assert_close(torch.cat([layer(x[:, i : i + 1]) for i in range(12)], 1), ref, atol=1e-5, rtol=1e-5)

    model = copy.deepcopy(ours_text)
    prompts = [torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 23)]
    config = GenerationConfig(max_new_tokens=16)
    expected = generate_ids(model, prompts, None, config)
    quantize(model, "fp32")
    assert quantized_head(model, "fp32") is None
    assert sum(isinstance(m, half.HalfLinear) for m in model.modules()) == 7 * model.config.text.num_hidden_layers
    assert generate_ids(model, prompts, None, config) == expected


def test_prefill_kernel_follows_the_cpu(kernel, monkeypatch):
    avx2_only = cpu.CPU.from_flags({"avx2", "fma", "f16c"}, "fake AVX2 EPYC")
    monkeypatch.setattr(cpu, "detect", lambda: avx2_only)
    layer = half.HalfLinear(torch.randn(40, 16), "bf16")
    assert layer.isa == "avx2" and not layer.bf16_gemm
    assert "blocks GEMM avx2 (ours, fp32 panels of the blocks; avx512_bf16 no, amx_bf16 no)" in layer.kernel
    x = torch.randn(20, 16)
    torch.testing.assert_close(layer(x).double(), x.double() @ layer.half_rows().double().T, atol=1e-4, rtol=1e-4)


def test_fp16_refuses_weights_it_cannot_hold():
    with pytest.raises(OpenMedGemmaError, match="fp16 cannot hold.*above fp16's 65504; use bf16"):
        half.HalfLinear(torch.tensor([[1.0, 7e4]]), "fp16")
    with pytest.raises(OpenMedGemmaError, match="unknown HalfLinear mode 'fp8'; use one of bf16, fp16, fp32"):
        half.HalfLinear(torch.ones(2, 2), "fp8")


def _rel_error_and_agreement(model, mode: str, prompt: list[int], new: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.logits(model.hidden_states(ids)[:, -1])
    fp32 = generate_ids(model, [prompt], None, GenerationConfig(max_new_tokens=new))[0]
    q = copy.deepcopy(model)
    quantize(q, mode)
    assert sum(isinstance(m, half.HalfLinear) for m in q.modules()) == 7 * q.config.text.num_hidden_layers
    head = quantized_head(q, mode) or q.logits  # fp32: the model's own tied head
    with torch.no_grad():
        out = head(q.hidden_states(ids)[:, -1])
    tokens = generate_ids(q, [prompt], None, GenerationConfig(max_new_tokens=new))[0]
    agree = sum(a == b for a, b in zip(fp32, tokens)) / new
    return float((out - ref).norm() / ref.norm()), agree


@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32"])
def test_tiny_model_logits_close_to_fp32(ours_text, mode):
    prompt = torch.randint(3, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    rel, agree = _rel_error_and_agreement(ours_text, mode, prompt, 32)
    print(f"tiny random model, {mode}: last-position logits rel. L2 error {rel:.2e}, greedy agreement {agree:.0%}")
    assert rel < LOGITS_REL[mode] and (rel > 0 or mode == "fp32")  # lossy formats do change the logits


@pytest.fixture(scope="module")
def nano():
    return MedGemma.from_pretrained(nano_path("medgemma"))


@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32"])
def test_nano_model_logits_close_to_fp32(nano, mode):
    model = nano
    cfg = model.config
    special = {cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index}
    gen = torch.Generator().manual_seed(1)
    prompt = [2] + [t for t in torch.randint(3, 2000, (80,), generator=gen).tolist() if t not in special][:63]
    rel, agree = _rel_error_and_agreement(model, mode, prompt, 32)
    print(f"nano model, {mode}: last-position logits rel. L2 error {rel:.2e}, greedy agreement {agree:.0%}")
    assert rel < LOGITS_REL[mode] and (rel > 0 or mode == "fp32")  # lossy formats do change the logits


def test_engine_says_once_what_it_picked(engine, capsys):
    capsys.readouterr()
    Engine(copy.deepcopy(engine.model), engine.tokenizer, quantize="bf16")
    err = capsys.readouterr().err.strip().splitlines()
    notices = [line for line in err if line.startswith("openmedgemma: bf16 weights")]
    assert len(notices) == 1, err
    line = notices[0]
    layers = 7 * engine.model.config.text.num_hidden_layers + 1  # + the tied head
    assert f"{layers} layers" in line and "decode:" in line and "prefill:" in line
    assert f"CPU {cpu.detect().describe()}" in line


def test_engine_accepts_every_mode_and_names_them_on_a_bad_one(engine):
    assert {"int8", "int8-dynamic", "bf16", "fp16"} <= set(MODES)
    with pytest.raises(OpenMedGemmaError, match="unknown quantization 'q3'; use one of " + ", ".join(MODES)):
        Engine(copy.deepcopy(engine.model), engine.tokenizer, quantize="q3")


# ---------------------------------------------------------------------- the whole model in bf16

BF16_LOGITS_ATOL = 0.03  # the tiny model's logits are ~0.6 at most, where a bf16 ulp is 1/256: a few roundings
NEAR_TIE = 2 / 256  # two bf16 ulps of a logit in [0.5, 1)
NEW_BF16 = 24


@pytest.mark.parametrize(("seed", "fast"), [(0, True), (3, False)], ids=["fast", "modules"])
def test_bf16_model_follows_transformers_bf16(hf_text, seed, fast):
    """`MedGemma.from_pretrained(..., dtype=torch.bfloat16)`: the engine decodes in bf16 (what `--dtype auto` picks on
    CPUs with native bf16). Its greedy tokens equal transformers' bf16 ones until the first step where transformers'
    own two best logits are within bf16 rounding of each other (the tiny random model's logits are flat, so such
    near-ties come within 10-25 tokens, and transformers fp32 vs bf16 part there too); its logits stay within
    BF16_LOGITS_ATOL of transformers' up to there."""
    from openmedgemma.engine import TokenStream

    hf = copy.deepcopy(hf_text[0]).to(torch.bfloat16)
    ours = MedGemma.from_pretrained(hf_text[1], dtype=torch.bfloat16)
    ids = torch.tensor([[2] + torch.randint(3, 90, (20,), generator=torch.Generator().manual_seed(seed)).tolist()])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW_BF16, min_new_tokens=NEW_BF16,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ref, scores = out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.scores)[:, 0].float()
    logits = []

    def head(hidden):
        logits.append(ours.logits(hidden))
        assert logits[-1].dtype == torch.bfloat16
        return logits[-1]

    config = GenerationConfig(max_new_tokens=NEW_BF16)
    tokens = [t[0] for t in TokenStream(ours, [ids[0].tolist()], [None], config, head=head, fast=fast)]
    same = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), len(ref))
    print(f"bf16, seed {seed}, {'fast' if fast else 'modules'}: {same} of {NEW_BF16} greedy tokens equal to transformers bf16")
    assert same >= 5
    torch.testing.assert_close(torch.cat(logits)[:same].float(), scores[:same], atol=BF16_LOGITS_ATOL, rtol=0)
    if same < len(ref):
        top2 = scores[same].topk(2).values
        assert float(top2[0] - top2[1]) <= NEAR_TIE, f"step {same}: ours {tokens[same]}, transformers {ref[same]}"
