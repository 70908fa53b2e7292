"""Run-time CPU detection and the kernel choices made from it, on fake flag sets of the three CPU kinds we meet."""

from __future__ import annotations

import pytest

from openmedgemma.engine import cpu, half
from openmedgemma.engine.dtype import cpu_flags, cpu_has_native_bf16

BASE = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}
AVX2_EPYC = BASE  # Zen 2 / 3
AVX512_EPYC = BASE | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}  # Zen 4
AMX_XEON = BASE | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
OLD = {"fpu", "sse4_2", "avx"}  # no AVX2: the native kernels cannot run


def test_features_from_flags():
    assert cpu.CPU.from_flags(AVX2_EPYC).features == {"avx2", "fma", "f16c"}
    assert cpu.CPU.from_flags(AVX512_EPYC).features == {"avx2", "fma", "f16c", "avx512", "avx512_vnni", "avx512_bf16"}
    assert {"amx_bf16", "amx_int8", "avx512"} <= cpu.CPU.from_flags(AMX_XEON).features
    assert cpu.CPU.from_flags({"avx512f"}).features == set()  # AVX-512 counts with BW only (the kernels use it)
    assert cpu.CPU.from_flags({"amx_bf16"}).features == set()  # AMX needs its tile state too
    with pytest.raises(KeyError, match="unknown CPU feature 'avx10'"):
        cpu.CPU.from_flags(AMX_XEON).has("avx10")


@pytest.mark.parametrize("flags", [AVX2_EPYC, AVX512_EPYC, AMX_XEON, OLD, set()])
def test_native_bf16_is_the_rule_dtype_uses(flags):
    assert cpu.CPU.from_flags(flags).native_bf16 == cpu_has_native_bf16(flags)


@pytest.mark.parametrize(
    ("flags", "kernels", "isa", "bf16_gemm"),
    [(AVX2_EPYC, True, "avx2", False), (AVX512_EPYC, True, "avx512", True), (AMX_XEON, True, "avx512", True),
     (OLD, False, "avx2", False)],
)  # fmt: skip
def test_kernel_choices_per_cpu(flags, kernels, isa, bf16_gemm):
    info = cpu.CPU.from_flags(flags)
    assert info.avx2_kernels == kernels
    assert half.decode_isa(info) == isa
    assert half.prefill_uses_bf16_gemm("bf16", info) == bf16_gemm
    assert not half.prefill_uses_bf16_gemm("fp16", info)  # fp16 prefill always widens to fp32


def test_description_names_the_model_and_features():
    line = cpu.CPU.from_flags(AMX_XEON, "Intel(R) Xeon(R) Platinum 8488C", "AVX512").describe()
    assert line == "Intel(R) Xeon(R) Platinum 8488C: avx2 fma f16c avx512 avx512_bf16 avx512_vnni amx_bf16 amx_int8; " \
                   "torch dispatch AVX512"  # fmt: skip
    assert "\n" not in line
    assert cpu.CPU.from_flags(OLD, "Old").describe().startswith("Old: none of avx2/")
    assert cpu.CPU.from_flags(AVX2_EPYC).why("avx512_bf16", "avx2") == "avx512_bf16 no, avx2 yes"


def test_detect_reads_this_machine():
    here = cpu.detect()
    assert here.features == cpu.CPU.from_flags(cpu_flags()).features
    assert here.torch_capability  # e.g. "AVX2", "AVX512", "DEFAULT"
    assert here.describe().startswith(here.model or "")
