"""16-bit decoder weights (bf16 or fp16), weight-only: half the bytes of fp32, activations stay in the model dtype.

`quantize(model, "bf16")` / `quantize(model, "fp16")` replace the decoder's linear layers by `HalfLinear`.
`quantize(model, "fp32")` does too, keeping the fp32 values: only the layout changes (the decode kernel's blocks
stream ~1.2x faster than BLAS's 1-row sgemm at one thread; prefill is the engine's GEMM over the blocks, about as fast
as BLAS's on the plain weight).
bf16 keeps fp32's range with 8 bits of mantissa (relative rounding 2^-9); fp16 has 11 bits (2^-12) but
overflows above 65504, which is refused at load. The kernels, chosen per CPU (`engine/cpu.py`) and
recorded in each layer's `kernel`, from measurements in benchmarks/RESULTS.md ("Weight formats on CPU"):
  - decode (at most DECODE_MAX_ROWS rows): the engine's `half_gemv` (`engine/half_gemv.cpp`), which widens
    each weight to fp32 in registers and streams the 16-bit weights at close to the memory bandwidth
    (1.7-5x faster than fp32 BLAS per matrix). Its AVX-512 variant where the CPU has AVX-512F/BW, else AVX2.
    Decode is bound by the bytes streamed; oneDNN's 1-row bf16 linear (torch's bf16 F.linear) measured
    0.87-1.43x fp32 on an AVX-512-BF16 EPYC, ours 1.7-5x, so ours is used on native-bf16 CPUs too.
    The AVX-512 and AVX2 variants measured within noise of each other there (both at the memory bandwidth).
  - prefill (more rows): where the CPU multiplies bf16 natively (AVX-512-BF16 or AMX-BF16) and the mode is
    bf16, one bf16 GEMM (oneDNN; the activations are rounded to bf16 too, inputs of the matmul only,
    accumulation in fp32), 1.1-2.3x faster than fp32 BLAS there (widening, then BLAS: 0.54-0.86x); elsewhere
    (no native bf16, or fp16, or fp32 blocks) the engine's GEMM over the blocks (`native.blocks_matmul`), which
    widens a block's panel to fp32 in the L1 and multiplies it in register tiles, as int8's prefill does: 0.8-1.4x
    the speed of fp32 BLAS on the fp32 weight at 1 thread, 1.1-2.1x at 2.
  - off the CPU, or where the native library cannot be built: the weight converted to x's dtype, F.linear.
Weights are held, on CPU with the kernel, in blocks of 32 output channels (`native.pack_blocks`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.engine import cpu, native
from openmedgemma.errors import OpenMedGemmaError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Above this many rows (prefill), one GEMM beats the matrix-vector kernel (which re-reads x per block).
DECODE_MAX_ROWS = 8
FP16_MAX = 65504.0


def half_gemv(x: torch.Tensor, blocks: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    """fp32 x [M, K] times 16-bit (or fp32) blocks [ceil(N / 32), K, 32] -> fp32 [M, N]; isa "avx2" or "avx512"."""
    return torch.ops.openmedgemma.half_gemv(x, blocks, n, isa)


@functools.cache
def kernel_available() -> bool:
    """The native library (all of `native.SOURCES`) loads here; registers the fake for torch.compile once."""
    if not native.int8_gemv_available():  # loads the whole library, half_gemv included
        return False
    torch.library.register_fake("openmedgemma::half_gemv")(lambda x, w, n, isa: x.new_empty((x.shape[0], n)))
    torch.library.register_fake("openmedgemma::half_gemv_group")(lambda x, w, n, isa: x.new_empty((x.shape[0], sum(n))))
    return True


def decode_isa(info: cpu.CPU) -> str:
    """The half_gemv variant for this CPU: AVX-512 (16 fp32 per register) where it has AVX-512F/BW."""
    return info.vector_isa


def prefill_uses_bf16_gemm(mode: str, info: cpu.CPU) -> bool:
    """bf16 GEMM for prefill only where bf16 is multiplied in hardware; emulated bf16 is slower than fp32 BLAS."""
    return mode == "bf16" and info.native_bf16


class HalfLinear(nn.Module):
    """A bias-free linear layer holding bf16, fp16 (or fp32) weights; `kernel` says which kernels run it and why.

    `weight_half` is [out, in], or on CPU with the native kernel its blocks [ceil(out / 32), in, 32].
    """

    def __init__(self, weight: torch.Tensor, mode: str = "bf16"):
        super().__init__()
        if mode not in DTYPES:
            raise OpenMedGemmaError(f"unknown HalfLinear mode {mode!r}; use one of {', '.join(DTYPES)}")
        w = weight.detach()
        if mode == "fp16" and w.is_floating_point() and float(w.abs().max()) > FP16_MAX:
            raise OpenMedGemmaError(f"fp16 cannot hold this weight ({list(w.shape)}): its largest magnitude "
                                    f"{float(w.abs().max()):.4g} is above fp16's {FP16_MAX:g}; use bf16")  # fmt: skip
        self.mode = mode
        self.out_features, self.in_features = w.shape
        on_cpu = w.device.type == "cpu"
        info = cpu.detect()
        half = w.to(DTYPES[mode]).contiguous()  # relayout_weights may have left it a transposed view
        blocked = on_cpu and kernel_available()
        self.register_buffer("weight_half", native.pack_blocks(half) if blocked else half)
        self.isa = decode_isa(info) if blocked else None
        self.bf16_gemm = on_cpu and prefill_uses_bf16_gemm(mode, info)
        self.kernel = self._describe(on_cpu, info)

    def _describe(self, on_cpu: bool, info: cpu.CPU) -> str:
        if not on_cpu:
            return f"{self.mode} weights converted to the activations' dtype, then the device's matmul"
        if self.isa and self.mode == "fp32":
            decode = f"decode: half_gemv {self.isa} (ours, fp32 blocks: one stream per 32 outputs; {info.why('avx512')})"
        elif self.isa:
            decode = f"decode: half_gemv {self.isa} (ours, widens to fp32 in registers; {info.why('avx512')})"
        else:
            decode = "decode: weights converted to fp32 per call (the native kernel could not be built)"
        if self.bf16_gemm:
            prefill = f"prefill: bf16 GEMM, oneDNN ({info.why('avx512_bf16', 'amx_bf16')})"
        elif self.isa:
            why = {"fp16": "fp16 weights", "fp32": "fp32 weights"}.get(self.mode) or info.why("avx512_bf16", "amx_bf16")
            prefill = f"prefill: blocks GEMM {self.isa} (ours, fp32 panels of the blocks; {why})"
        else:
            prefill = "prefill: weights converted to fp32 + BLAS"
        return f"{decode}; {prefill}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def half_rows(self) -> torch.Tensor:
        """The 16-bit weight as [out, in] (a copy if held in blocks)."""
        w = self.weight_half
        return w if w.dim() == 2 else native.unpack_blocks(w, self.out_features)

    @staticmethod
    def group_forward(layers: tuple[HalfLinear, ...], x: torch.Tensor) -> torch.Tensor | None:
        """Layers of one group (same input, e.g. q, k, v) in one kernel call at decode: their outputs side by side;
        None otherwise (then each layer runs)."""
        x2 = x.reshape(-1, layers[0].in_features)
        if not layers[0].isa or x2.shape[0] > DECODE_MAX_ROWS or x.device.type != "cpu":
            return None
        y = torch.ops.openmedgemma.half_gemv_group(native.kernel_rows(x, x.shape[-1]), [m.weight_half for m in layers],
                                                   [m.out_features for m in layers], layers[0].isa)  # fmt: skip
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.isa and x2.shape[0] <= DECODE_MAX_ROWS:
            y = half_gemv(native.kernel_rows(x2, self.in_features), self.weight_half, self.out_features, self.isa)
            y = y.to(x.dtype)
        else:
            y = self.dense_matmul(x2, torch.bfloat16 if self.bf16_gemm else x.dtype).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def dense_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x times the weight, both in `dtype` (the weight converted and, from blocks, re-laid out in one pass)."""
        w = self.weight_half
        if w.dim() == 2:
            return F.linear(x.to(dtype), w.to(dtype))
        return native.blocks_matmul(x.to(dtype), w, self.out_features)
