"""The compiled int8 CPU kernel (engine/native.py + int8_gemv.cpp): built, within its int16 rounding bound, traceable.

In CI (CI=true, an x86-64 AVX2 machine with g++) the kernel must build: a missing kernel there is a
failure, not a skip, since int8 decode would silently fall back to torch's slow kernel.
"""

from __future__ import annotations

import pytest
import torch

from openmedgemma.engine import Int8Linear, cpu, native
from openmedgemma.engine.quant import quantize_weight


def _reference(x, q, scale):
    return (x.double() @ (q.double() * scale.double()[:, None]).T).float()  # exact products, one rounding


EPS = torch.finfo(torch.float32).eps
GROUP = 256  # kGroup in int8_gemv.cpp: x is rounded to int16 per group of this many inputs
SHAPES = [(32, 64, 1), (40, 64, 1), (33, 7, 3), (1, 1, 1), (100, 129, 8), (96, 2, 5), (70, 600, 2), (40, 513, 1),
          (64, 1031, 2)]  # fmt: skip


@pytest.fixture(scope="module")
def isas(kernel):
    """The kernel variants this CPU runs: always AVX2, AVX-512 VNNI where the CPU has it."""
    best = torch.ops.openmedgemma.int8_best_isa()
    return ["avx2"] if best == "avx2" else ["avx2", best]


def _fp32_bound(x, q, scale):
    """The fp32 dot-product error bound k * eps * sum |x_i w_i| of each output."""
    return x.shape[1] * EPS * (x.double().abs() @ (q.double().abs() * scale.double()[:, None]).T)


def _int16_bound(x, q, scale):
    """The error bound of the kernel's rounding of x (|x - dx * xq| <= dx / 2 per input, dx = max|x| / 32767 over
    its group of 256), plus fp32 rounding."""
    dx = torch.stack([x[:, g : g + GROUP].abs().amax(1) / 32767 for g in range(0, x.shape[1], GROUP)], 1)
    half_step = dx.double().repeat_interleave(GROUP, 1)[:, : x.shape[1]] / 2
    return half_step @ (q.double().abs() * scale.double()[:, None]).T + 2 * _fp32_bound(x, q, scale)


def _case(n, k, m):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return q, torch.rand(n, generator=gen) + 0.01, gen


@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_kernel_is_exact_when_x_is_on_the_int16_grid(isas, n, k, m):
    """x = dx * integers with |.| <= 32767 (one of them 32767 in each group, dx a power of 2) is rounded exactly,
    so every product and each group's sum is an exact integer one: only fp32 rounding is left."""
    q, scale, gen = _case(n, k, m)
    xq = torch.randint(-32767, 32768, (m, k), generator=gen)
    xq[:, ::GROUP] = 32767
    x = (xq.double() * 2.0**-20).float()
    for isa in isas:
        y = native.int8_gemv(x, native.pack_blocks(q), scale, n, isa)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert ((y.double() - _reference(x, q, scale).double()).abs() <= _fp32_bound(x, q, scale) + 1e-30).all(), isa


@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_kernel_error_is_within_the_int16_rounding_bound_and_the_same_bits_on_every_isa(isas, n, k, m):
    q, scale, gen = _case(n, k, m)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 10  # inputs of different ranges
    outs = [native.int8_gemv(x, native.pack_blocks(q), scale, n, isa) for isa in isas]
    bound = _int16_bound(x, q, scale)
    for isa, y in zip(isas, outs):
        assert ((y.double() - _reference(x, q, scale).double()).abs() <= bound + 1e-30).all(), isa
        assert torch.equal(y, outs[0]), isa  # integer sums are exact and the fp32 ones run in one order


def test_inf_or_nan_in_x_gives_non_finite_outputs_not_garbage(isas):
    q = torch.randint(-127, 128, (40, 300), dtype=torch.int8)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 300)
        x[0, 280] = bad  # in the second group of row 0
        for isa in isas:
            y = native.int8_gemv(x, native.pack_blocks(q), torch.rand(40) + 0.1, 40, isa)
            assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all(), (bad, isa)


def test_blocks_round_trip_and_pad_with_zeros():
    q = torch.randint(-127, 128, (45, 6), dtype=torch.int8)
    blocks = native.pack_blocks(q)
    assert blocks.shape == (2, 6, 32) and blocks.is_contiguous()
    assert torch.equal(blocks[1, :, 13:], torch.zeros(6, 19, dtype=torch.int8))  # rows 45..63
    assert torch.equal(blocks[0, 2], q[:32, 2])  # block 0, input 2: the 32 channels' weights side by side
    assert torch.equal(native.unpack_blocks(blocks, 45), q)


def test_threads_split_blocks_without_changing_the_result(isas):
    q = torch.randint(-127, 128, (1000, 300), dtype=torch.int8)
    scale, x = torch.rand(1000), torch.randn(2, 300)
    threads = torch.get_num_threads()
    for isa in isas:
        try:
            torch.set_num_threads(1)
            one = native.int8_gemv(x, native.pack_blocks(q), scale, 1000, isa)
            torch.set_num_threads(2)
            two = native.int8_gemv(x, native.pack_blocks(q), scale, 1000, isa)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two), isa  # each output is summed by one thread, in the same order


def test_bad_arguments_are_refused_with_the_reason(kernel):
    blocks = native.pack_blocks(torch.zeros(40, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x has 9 columns but w has K = 8"):
        native.int8_gemv(torch.zeros(1, 9), blocks, torch.ones(40), 40)
    with pytest.raises(RuntimeError, match="cannot hold N = 80"):
        native.int8_gemv(torch.zeros(1, 8), blocks, torch.ones(80), 80)
    with pytest.raises(RuntimeError, match="fp32"):
        native.int8_gemv(torch.zeros(1, 8, dtype=torch.float64), blocks, torch.ones(40), 40)
    with pytest.raises(RuntimeError, match="isa must be auto, avx2 or avx512vnni, not sse"):
        native.int8_gemv(torch.zeros(1, 8), blocks, torch.ones(40), 40, "sse")


def test_op_is_a_well_formed_torch_op_and_compiles_without_graph_breaks(kernel):
    args = (torch.randn(2, 10), native.pack_blocks(torch.randint(-127, 128, (40, 10), dtype=torch.int8)),
            torch.rand(40), 40)  # fmt: skip
    torch.library.opcheck(torch.ops.openmedgemma.int8_gemv.default, args)  # schema, fake tensor, dispatch
    layer = Int8Linear(torch.randn(40, 10))
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    x = torch.randn(1, 10)
    torch.testing.assert_close(compiled(x), layer(x))


def test_int8_linear_uses_the_kernel_on_cpu_and_torch_without_it(kernel, monkeypatch):
    w = torch.randn(70, 48)
    x = torch.randn(2, 48)
    q, scale = quantize_weight(w)
    fast = Int8Linear(w)
    assert fast.weight_int8.shape == (3, 48, 32)  # held in the kernel's blocks
    assert torch.equal(fast.int8_rows(), q)
    monkeypatch.setattr(native, "int8_gemv_available", lambda: False)
    plain = Int8Linear(w)
    assert plain.weight_int8.shape == (70, 48)  # torch's _weight_int8pack_mm layout
    ref = _reference(x, q, scale)
    assert ((fast(x) - ref).abs() <= _int16_bound(x, q, scale)).all()  # the kernel rounds x to int16
    torch.testing.assert_close(plain(x), ref, atol=1e-4, rtol=1e-4)
    for layer in (fast, plain):  # prefill
        torch.testing.assert_close(layer.dequant_matmul(x), ref, atol=1e-4, rtol=1e-4)


def test_a_failed_build_is_one_clear_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENMEDGEMMA_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(native.NativeBuildError, match="false failed to compile int8_gemv.cpp"):
        native._build()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="could not run"):
        native._build()
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left in the cache
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("OPENMEDGEMMA_CACHE", str(blocker))  # cache cannot be created: builds in a temp folder
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(native.NativeBuildError, match="failed to compile"):
        native._build()


def test_disabled_kernel_says_why_once(monkeypatch, capsys):
    monkeypatch.setenv("OPENMEDGEMMA_NATIVE", "0")
    native.int8_gemv_available.cache_clear()
    try:
        assert native.int8_gemv_available() is False
        assert native.int8_gemv_available() is False
        err = capsys.readouterr().err
        assert err.count("the int8 CPU kernel is not used (OPENMEDGEMMA_NATIVE=0)") == 1
    finally:
        native.int8_gemv_available.cache_clear()  # the next caller loads it again (dlopen of a loaded library)


# ------------------------------------------------------------------ the decoder norms' kernel (rms_norm.cpp)


@pytest.mark.parametrize(("shape", "rows_of_gain"), [((1, 1, 768), 1), ((2, 3, 9, 128), 9), ((5, 13), 1), ((4, 7), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_equals_the_model_norm(kernel, shape, rows_of_gain, dtype):
    """One op = the model's no-grad norm (x * rsqrt(mean(x^2) + eps) * gain) up to the order of the sum of squares;
    a gain of G rows (q and k heads normed together with stacked gains) repeats over x's rows. bf16 x (a model
    loaded in bf16) is normed in fp32 and rounded once, as the torch ops do: the same bf16 values, but where the
    sums' order moves an fp32 result across a rounding boundary (one unit in the last place)."""
    from openmedgemma.model.layers import GemmaRMSNorm

    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    gain = torch.randn(rows_of_gain, shape[-1], generator=gen) if rows_of_gain > 1 else None
    norm = GemmaRMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        want = norm(x, gain)
        norm.fused = native.rms_norm
        got = norm(x, gain)
    assert got.dtype == dtype
    reference = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    reference = reference * (norm.gain() if gain is None else gain).double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
        return
    ulp = _bf16_ulp(want)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).float().mean() < 0.01
    assert ((got.double() - reference).abs() <= reference.abs() * 2**-8 + 1e-6).all()  # one bf16 rounding


def _bf16_ulp(t):
    """One unit in the last place of each bf16 value (2^-7 of its power of two)."""
    return torch.ldexp(torch.full(t.shape, 2.0**-7), torch.frexp(t.float()).exponent - 1)


def test_rms_norm_kernel_declines_what_it_does_not_take_and_refuses_bad_gains(kernel):
    gain = torch.ones(2, 8)
    assert native.rms_norm(torch.randn(3, 8, dtype=torch.float16), gain[0], 1e-6) is None  # the torch ops run it
    assert native.rms_norm(torch.randn(8, 3).t(), gain[0], 1e-6) is None  # not contiguous
    with pytest.raises(RuntimeError, match="last dimension D = 8"):
        torch.ops.openmedgemma.rms_norm(torch.randn(3, 8), torch.ones(6), 1e-6)
    with pytest.raises(RuntimeError, match="a gain of 2 rows needs x"):
        torch.ops.openmedgemma.rms_norm(torch.randn(3, 8), gain, 1e-6)
    torch.library.opcheck(torch.ops.openmedgemma.rms_norm.default, (torch.randn(2, 2, 8), gain, 1e-6))


# ------------------------------------------------------------------ the MLP's activation (gelu_mul.cpp)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 1152), (3, 5, 2 * 37), (2, 2 * 8), (64, 2 * 10240)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_mul_kernel_equals_gelu_of_gate_times_up(kernel, shape, dtype):
    """gelu_tanh(gate) * up from the gate|up projection's output, one op, tails past a multiple of 8 included:
    torch's chunk, gelu and mul to fp32 rounding (fp32); bf16, rounded as torch's bf16 ops round (gelu to bf16, then
    the product): all but a few values equal to those roundings of the exact gelu, and each within one unit in
    the last place of torch's (whose fp32 1 + tanh(u) loses digits for g < 0, and is 0 for g << 0)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(shape, generator=gen) * 3).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    want = F.gelu(gate, approximate="tanh") * up
    got = native.gelu_tanh_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:  # atol: where torch's 1 + tanh(u) cancels to 0 for g << 0, this is nearer the truth
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    exact = (_gelu64(gate.double()).bfloat16() * up).bfloat16()
    assert (got != exact).float().mean() < 0.005
    # 1e-6: torch's 1 + tanh(u) is 0 in fp32 for g < -4.5 or so, where the exact gelu is tiny but not 0
    assert ((got.float() - want.float()).abs() <= torch.maximum(_bf16_ulp(want), _bf16_ulp(got)) + 1e-6).all()


def _gelu64(g):
    """gelu_tanh in float64 as g * sigmoid(2u) = 0.5 g (1 + tanh(u)), exactly, without the cancellation."""
    return g * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3))


def test_gelu_mul_kernel_is_accurate_where_one_plus_tanh_cancels(kernel):
    """g / (1 + exp(-2u)) is the same function as 0.5 g (1 + tanh(u)) without its cancellation for g << 0, where
    torch's fp32 gives 0: within 1e-5 relative of the float64 value over [-12, 12]; inf and NaN stay non-finite."""
    g = torch.linspace(-12, 12, 24001).double()  # the fp32 values the kernel sees
    truth = _gelu64(g)
    got = native.gelu_tanh_mul(torch.cat([g, torch.ones_like(g)]).float()).double()
    assert ((got - truth).abs() <= truth.abs() * 1e-5 + 1e-37).all()
    special = native.gelu_tanh_mul(torch.tensor([float("nan"), float("inf"), 1.0, 1.0]))
    assert special[0].isnan() and special[1] == float("inf")


def test_gelu_mul_kernel_declines_what_it_does_not_take_and_refuses_bad_shapes(kernel):
    assert native.gelu_tanh_mul(torch.randn(2, 8, dtype=torch.float16)) is None
    assert native.gelu_tanh_mul(torch.randn(8, 2).t()) is None  # not contiguous
    with pytest.raises(RuntimeError, match=r"\[\.\.\., 2 I\]"):
        torch.ops.openmedgemma.gelu_tanh_mul(torch.randn(3, 7))
    torch.library.opcheck(torch.ops.openmedgemma.gelu_tanh_mul.default, (torch.randn(2, 3, 16),))


# ------------------------------------------------------------------ bf16 activations in and out of the kernels


def test_kernels_take_bf16_rows_and_return_them_rounded_once(kernel):
    """A model loaded in bf16 passes its bf16 rows straight to the decode kernels: each gives exactly what its fp32
    version gives on the widened rows, rounded to bf16 (int4, int8, 16-bit / fp32 blocks, attention)."""
    from openmedgemma.engine.int4 import pack_int4, quantize_int4

    ops = torch.ops.openmedgemma
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(300, 520, generator=gen)
    x = torch.randn(3, 520, generator=gen).bfloat16()
    q4, s4 = pack_int4(*quantize_int4(w))
    q8, s8 = quantize_weight(w)
    blocks8 = native.pack_blocks(q8)
    cases = [(ops.int4_gemv, (q4, s4, 300)), (ops.int4_gemv_group, ([q4, q4], [s4, s4], [300, 300])),
             (ops.int8_gemv, (blocks8, s8.float(), 300)), (ops.int8_gemv_group, ([blocks8], [s8.float()], [300]))]
    for isa in ("avx2", "avx512") if cpu.detect().vector_isa == "avx512" else ("avx2",):
        for half in (torch.bfloat16, torch.float16, torch.float32):
            cases.append((ops.half_gemv, (native.pack_blocks(w.to(half)), 300, isa)))
    for op, args in cases:
        got = op(x, *args)
        assert got.dtype == torch.bfloat16 and torch.equal(got, op(x.float(), *args).bfloat16()), op
    q = torch.randn(2, 12, 1, 64, generator=gen).bfloat16()[:, :8]
    k, v = (torch.randn(2, 4, 9, 64, generator=gen).bfloat16() for _ in range(2))
    got = native.decode_attention(q, k, v, None, 0.125)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ops.decode_attention(q.float(), k, v, None, 0.125).bfloat16())


def test_bf16_outputs_round_as_torch_rounds(kernel):
    """The kernels' fp32 -> bf16 rounding (widen.h) is torch's: to nearest, ties to even, overflow to inf, denormals
    kept, NaN a NaN: an fp32-blocks weight times x = 1 writes the weight's values through it."""
    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3.3961e38, -3.4e38, 3.3e38,
                           float("inf"), -float("inf"), 1e-40, -3e-39, 2.0**-133, 0.0, 65504.0, 0.1, -1 / 3,
                           float("nan")] * 3)  # fmt: skip
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    half_gemv = torch.ops.openmedgemma.half_gemv
    want = values.bfloat16()
    finite = ~want.isnan()
    eight_at_a_time = half_gemv(x, native.pack_blocks(values[:, None]), values.numel(), "avx2")[0]
    one_at_a_time = torch.cat([half_gemv(x, native.pack_blocks(v.view(1, 1)), 1, "avx2")[0] for v in values])
    for got in (eight_at_a_time, one_at_a_time):
        assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))  # bit for bit
        assert got[~finite].isnan().all()


# ------------------------------------------------------------------ decode attention (attention.cpp)


def _attention_reference(q, k, v, mask, scale):
    """float64 softmax(scale q k^T over allowed keys) v, the KV heads shared by Hq / Hkv query heads each."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "s", "d", "mask"),
    [(1, 6, 3, 257, 128, "prefix"), (2, 4, 4, 9, 20, "per-row"), (3, 8, 2, 33, 64, None), (2, 2, 1, 1, 8, "prefix")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_softmax_attention(kernel, b, hq, hkv, s, d, mask, dtype):
    """One query per row over a cache slice (strided k / v, q a slice of q and k side by side, as the model has
    them), GQA without repeating the cache, masks shared by the rows or per row: float64 softmax attention and
    torch's SDPA, to fp32 rounding; a bf16 cache (a model loaded in bf16) is read as its exact values, the
    result rounded to bf16 once."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(b * 100 + s)
    q = torch.randn(b, hq + hkv, 1, d, generator=gen).to(dtype)[:, :hq]
    k = torch.randn(b, hkv, s + 7, d, generator=gen).to(dtype)[:, :, :s]  # a cache with room left
    v = torch.randn(b, hkv, s + 7, d, generator=gen).to(dtype)[:, :, :s]
    if mask == "prefix":
        mask = (torch.arange(s) <= s * 2 // 3)[None, None, None]
    elif mask == "per-row":
        mask = torch.rand(b, 1, 1, s, generator=gen) < 0.6
        mask[..., -1] = True  # a decode row always sees its own key
    out = native.decode_attention(q, k, v, mask, 0.3)
    assert out.shape == (b, hq, 1, d) and out.is_contiguous() and out.dtype == dtype
    ref = _attention_reference(q.double(), k.double(), v.double(), mask, 0.3)
    if dtype == torch.bfloat16:  # exact inputs, fp32 sums, one rounding to bf16 (2^-9 relative)
        assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
        return
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-6)


def test_decode_attention_declines_what_it_does_not_take_and_refuses_bad_shapes(kernel):
    q, k, mask = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16), torch.ones(1, 1, 1, 5, dtype=torch.bool)
    out = native.decode_attention(q, k, k, mask, 0.25)
    none = mask.clone()
    none[0, 0, 0, :] = False  # no key allowed: zeros, not NaN
    assert torch.equal(native.decode_attention(q, k, k, none, 0.25), torch.zeros_like(out))
    assert native.decode_attention(torch.randn(1, 4, 2, 16), k, k, None, 0.25) is None  # prefill: SDPA runs it
    assert native.decode_attention(q, k.bfloat16(), k.bfloat16(), None, 0.25) is None  # mixed dtypes: SDPA
    assert native.decode_attention(q.half(), k.half(), k.half(), None, 0.25) is None
    assert native.decode_attention(q, k, k, mask.float(), 0.25) is None  # additive masks: SDPA
    assert native.decode_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k, None, 0.25) is None
    ops = torch.ops.openmedgemma
    with pytest.raises(RuntimeError, match=r"mask must be boolean \[1 or B, 1, 1, S\] with S = 5"):
        ops.decode_attention(q, k, k, torch.ones(1, 1, 1, 6, dtype=torch.bool), 0.25)
    with pytest.raises(RuntimeError, match="3 query heads do not share 2 KV heads"):
        ops.decode_attention(q[:, :3], k, k, None, 0.25)
    with pytest.raises(RuntimeError, match="k and v must be both fp32 or both bf16, q fp32 or their dtype"):
        ops.decode_attention(q, k.bfloat16(), k, None, 0.25)
    with pytest.raises(RuntimeError, match="k and v must be both fp32 or both bf16, q fp32 or their dtype"):
        ops.decode_attention(q.bfloat16(), k, k, None, 0.25)
    with pytest.raises(RuntimeError, match="one query per row"):
        ops.decode_attention(torch.randn(1, 4, 2, 16), k, k, None, 0.25)
    torch.library.opcheck(ops.decode_attention.default, (q, k, torch.randn(1, 2, 5, 16), mask, 0.25))


# ------------------------------------------------------------------ prefill over the blocks


def _blocked_weight(dtype, n, k, gen):
    w = torch.randn(n, k, generator=gen) * 40
    return w.round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else w.to(dtype)


ISAS = ["avx2", pytest.param("avx512", marks=pytest.mark.skipif(not cpu.detect().has("avx512"), reason="no AVX-512"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "k", "n"), [(11, 37, 170), (1, 300, 64), (13, 512, 32), (600, 300, 450)])
def test_prefill_gemm_equals_x_times_the_weight_times_the_scale(kernel, isa, dtype, m, k, n):
    """blocks.cpp's GEMM over blocks [B, K, 32]: x @ w.T * scale to fp32 rounding, for row counts that are not a
    multiple of the register tile (12 / 6), K in several passes of 256 inputs (300, 512), outputs in several groups
    (600 rows: 3 blocks per group, 15 blocks) and N not a multiple of 32 (the padding's columns cut)."""
    gen = torch.Generator().manual_seed(m * k + n)  # other values per case: no stale buffer matches
    w = _blocked_weight(dtype, n, k, gen)
    x, scale = torch.randn(m, k, generator=gen), torch.rand(n, generator=gen) + 0.5
    ref = x.double() @ w.double().T
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-9  # fp32 sums of <= 512 terms, in any order
    got = torch.ops.openmedgemma.blocks_matmul(x, native.pack_blocks(w), None, n, isa)
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - ref).abs() <= bound).all()
    scaled = torch.ops.openmedgemma.blocks_matmul(x, native.pack_blocks(w), scale, n, isa)
    assert ((scaled.double() - ref * scale.double()).abs() <= bound * scale.double() * 1.01).all()


def test_prefill_gemm_splits_blocks_over_threads_without_changing_the_result(kernel):
    gen = torch.Generator().manual_seed(3)
    blocks, x = native.pack_blocks(_blocked_weight(torch.int8, 700, 300, gen)), torch.randn(40, 300, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.blocks_matmul(x, blocks, 700)
        torch.set_num_threads(2)
        two = native.blocks_matmul(x, blocks, 700)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is summed by one thread, in the same order


def test_prefill_gemm_refuses_bad_arguments_and_is_a_well_formed_op(kernel):
    ops = torch.ops.openmedgemma
    blocks, x = native.pack_blocks(torch.ones(64, 16, dtype=torch.int8)), torch.randn(3, 16)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous fp32 CPU matrix \[M, K\]"):
        ops.blocks_matmul(x.double(), blocks, None, 64, "avx2")
    with pytest.raises(RuntimeError, match="K = x's"):
        ops.blocks_matmul(torch.randn(3, 17), blocks, None, 64, "avx2")
    with pytest.raises(RuntimeError, match="n must be within the last block"):
        ops.blocks_matmul(x, blocks, None, 65, "avx2")
    with pytest.raises(RuntimeError, match="scale must be a contiguous fp32 vector of n values"):
        ops.blocks_matmul(x, blocks, torch.ones(63), 64, "avx2")
    with pytest.raises(RuntimeError, match="isa must be 'avx2' or 'avx512', got 'sse'"):
        ops.blocks_matmul(x, blocks, None, 64, "sse")
    torch.library.opcheck(ops.blocks_matmul.default, (x, blocks, torch.rand(64), 64, "avx2"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("widen_bytes", [1 << 30, 2 * 37 * 32 * 2])  # all blocks at once; two per GEMM
def test_blocks_matmul_is_x_times_the_weight(kernel, dtype, widen_bytes, monkeypatch):
    """Prefill over blocks [B, K, 32] equals x @ w.T (times the scale) for the weight they hold, in fp32 (the GEMM
    above) and with bf16 activations (oneDNN's GEMM on a few blocks' columns at a time); the columns [K, N] hold
    the same weight."""
    monkeypatch.setattr(native, "WIDEN_BYTES", widen_bytes)
    gen = torch.Generator().manual_seed(widen_bytes % 1000)
    w = _blocked_weight(dtype, 170, 37, gen)  # 6 blocks
    blocks, scale = native.pack_blocks(w), torch.rand(170, generator=gen) + 0.5
    x = torch.randn(11, 37, generator=gen)
    got = native.blocks_matmul(x, blocks, 170, scale)
    assert got.shape == (11, 170) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ w.float().T * scale, rtol=1e-5, atol=1e-3)
    half = native.blocks_matmul(x.bfloat16(), blocks, 170, scale)  # bf16 activations
    assert half.shape == (11, 170) and half.dtype == torch.bfloat16
    ref = x.bfloat16().float() @ w.bfloat16().float().T * scale.bfloat16().float()
    torch.testing.assert_close(half.float(), ref, rtol=0.02, atol=0.5)
    columns = native.blocks_to_columns(blocks, torch.float32)
    assert columns.shape == (37, 192) and torch.equal(columns[:, :170], w.float().T) and not columns[:, 170:].any()


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_bf16_columns_op_equals_the_permuted_copy(kernel, dtype):
    """Blocks -> bf16 columns [K, B * 32] in one parallel pass (blocks.cpp): exactly the torch copy of the permuted
    view (int8 values are bf16 values), zero padding past N included; other dtypes are refused."""
    w = (torch.randn(70, 37, generator=torch.Generator().manual_seed(5)) * 60).round().clamp(-128, 127)
    w = w.to(torch.int8) if dtype == torch.int8 else w.bfloat16()
    blocks = native.pack_blocks(w)
    got = torch.ops.openmedgemma.blocks_to_bf16_columns(blocks)
    assert got.dtype == torch.bfloat16 and got.shape == (37, 96)
    assert torch.equal(got[:, :70], w.bfloat16().T) and not got[:, 70:].any()
    copy = torch.empty(37, 3, 32, dtype=torch.bfloat16).copy_(blocks.permute(1, 0, 2)).view(37, -1)
    assert torch.equal(got, copy)
    with pytest.raises(RuntimeError, match=r"contiguous int8 or bfloat16 CPU blocks \[B, K, 32\]"):
        torch.ops.openmedgemma.blocks_to_bf16_columns(blocks.float())

