"""Int4 weights for the decoder: symmetric, one fp16 scale per group of 32 inputs (llama.cpp's q4_0 bits).

`quantize(model, "int4")` (engine/quant.py) replaces the decoder's linear layers by `Int4Linear`. Each
group of 32 weights of one output channel along K gets a scale d = (its largest-magnitude weight) / -8
and values q = round(w / d) in -8..7, so w ~= q * d; 4.5 bits per weight with the fp16 scale.
  - CPU, decode and prefill: the engine's kernel (`int4_gemv.cpp`, AVX2 or AVX-512 VNNI picked at run
    time), which quantizes each activation row to int8 per group of 32 and runs integer dot products, so
    it streams the 4-bit weights at memory speed (0.56 bytes per weight; fp32 reads 4). Its integer dot
    products also beat fp32 BLAS on many rows (128 rows, 1 thread: 2.7-3.6x with VNNI, 1.7-2.5x AVX2),
    and dequantizing a 4B model's weights for each prefill would cost more than the matmuls, so prefill
    runs through it too.
  - other devices (or no kernel): dequantize to the activation dtype, then one matmul.
Weights are packed once, at quantization, in the kernel's layout (`pack_int4`; `int4_rows` undoes it),
whatever the device, so savers and tests read one format. Quantizing reads the source weight (any
dtype, e.g. bf16) a slice of rows at a time, so a 4B model never needs an fp32 copy of itself, nor of
its 262k-row output head.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.engine import hugepages, native
from openmedgemma.errors import OpenMedGemmaError

GROUP = 32  # inputs per scale: kGroup in int4_gemv.cpp
BLOCK = 32  # output channels per kernel block: kBlock in int4_gemv.cpp
CHUNK = BLOCK * GROUP // 2  # bytes per (block, group)
SLICE_ELEMENTS = 1 << 22  # weights quantized at a time: bounds each fp32 temporary to ~16 MB


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, G * 32] in -8..7, zero padded past K; scale fp16 [N, G]) with weight ~= q * scale per group.

    Each group's scale is its largest-magnitude weight over -8 (as q4_0), rounded to fp16 before q is
    computed, so |w - q * d| <= |d| / 2, except a weight of the opposite sign and the same magnitude
    as the largest, which is clamped to 7 (error |d|).
    """
    n, k = weight.shape
    w = F.pad(weight.detach().float(), (0, -k % GROUP)).view(n, -1, GROUP)
    peak = w.gather(2, w.abs().argmax(2, keepdim=True))  # signed, [N, G, 1]
    scale = (peak / -8).clamp(-65504, 65504).half()
    d = scale.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (w * inv).round_().clamp_(-8, 7).to(torch.int8)
    return q.view(n, -1), scale.view(n, -1)


def pack_int4(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, G * 32], scale [N, G]) -> the kernel's (uint8 [ceil(N / 32), G, 512], fp16 [ceil(N / 32), G, 32]).

    Layout in int4_gemv.cpp's header: byte t * 128 + c * 4 + j of a (block, group) holds q + 8 of channel
    c, input 8t + j (low nibble) and input 8t + 4 + j (high nibble). Padded channels: q = 0, scale 0.
    """
    n, kp = q.shape
    pad = -n % BLOCK
    u = F.pad((q + 8).to(torch.uint8), (0, 0, 0, pad), value=8)
    g = kp // GROUP
    # [nb, c, G, t, half, j] -> [nb, G, t, half, c, j]: half 0 = low nibble, half 1 = high
    u = u.view(-1, BLOCK, g, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    packed = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).reshape(-1, g, CHUNK)
    scales = F.pad(scale, (0, 0, 0, pad)).view(-1, BLOCK, g).transpose(1, 2).contiguous()
    return packed, scales


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_int4`: (q int8 [n, G * 32], scale fp16 [n, G])."""
    nb, g, _ = packed.shape
    p = packed.view(nb, g, 4, 1, BLOCK, 4)
    u = torch.cat((p & 15, p >> 4), dim=3)  # [nb, G, t, half, c, j]
    q = u.permute(0, 4, 1, 2, 3, 5).reshape(nb * BLOCK, g * GROUP)[:n].to(torch.int8) - 8
    return q, scales.transpose(1, 2).reshape(nb * BLOCK, g)[:n]


@functools.cache
def kernel_isa() -> str | None:
    """The instruction set our kernel runs with on this CPU ("avx512vnni" or "avx2"), None without the kernel."""
    if not native.int8_gemv_available():  # loads (or builds) the one library that holds every kernel
        return None
    torch.library.register_fake("openmedgemma::int4_gemv")(_fake)
    torch.library.register_fake("openmedgemma::int4_dequant")(_fake_dequant)
    torch.library.register_fake("openmedgemma::int4_gemv_group")(_fake_group)
    return torch.ops.openmedgemma.int4_best_isa()


def _fake(x, w, scale, n, isa="auto"):  # output shape for torch.compile's tracing
    return x.new_empty((x.shape[0], n))


def _fake_group(x, w, scale, n, isa="auto"):
    return x.new_empty((x.shape[0], sum(n)))


def _fake_dequant(w, scale, n, k):
    return w.new_empty((n, k), dtype=torch.float32)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int, isa: str = "auto") -> torch.Tensor:
    """fp32 x [M, K] times the packed int4 weight -> fp32 [M, N] (needs `kernel_isa()`); isa forces a variant."""
    return torch.ops.openmedgemma.int4_gemv(x, packed, scales, n, isa)


_KERNELS = {
    "avx512vnni": "ours, AVX-512 VNNI (activations to int8 per group of 32, vpdpbusd integer dot products)",
    "avx2": "ours, AVX2 (activations to int8 per group of 32, maddubs integer dot products)",
}


class Int4Linear(nn.Module):
    """A bias-free linear layer holding int4 weights (packed for the kernel) and fp16 group scales."""

    def __init__(self, weight: torch.Tensor, mode: str = "int4"):
        super().__init__()
        if mode != "int4":
            raise OpenMedGemmaError(f"unknown int4 mode {mode!r}; use int4")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        nb, g = -(-self.out_features // BLOCK), -(-self.in_features // GROUP)
        packed = hugepages.empty((nb, g, CHUNK), torch.uint8)  # filled a slice at a time: no second copy
        scales = hugepages.empty((nb, g, BLOCK), torch.float16)
        rows = max(BLOCK, SLICE_ELEMENTS // max(self.in_features, 1) // BLOCK * BLOCK)  # whole blocks per slice
        for start in range(0, self.out_features, rows):
            p, s = pack_int4(*quantize_int4(weight[start : start + rows]))
            packed[start // BLOCK : start // BLOCK + len(p)], scales[start // BLOCK : start // BLOCK + len(s)] = p, s
        self.register_buffer("weight_int4", packed.to(weight.device))
        self.register_buffer("scale", scales.to(weight.device))
        isa = kernel_isa() if weight.device.type == "cpu" else None
        self.isa = isa
        if isa is not None:
            self.kernel = f"{_KERNELS[isa]}, decode and prefill"
        elif weight.device.type == "cpu":
            self.kernel = "dequantize + matmul (the int4 CPU kernel is not available here; see the message above)"
        else:
            self.kernel = f"dequantize + matmul on {weight.device.type} (saves memory, not time)"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, group={GROUP}"

    def int4_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in] in -8..7, scale fp16 [out, ceil(in / 32)]): weight = q * scale per group of 32."""
        q, scale = unpack_int4(self.weight_int4, self.scale, self.out_features)
        return q[:, : self.in_features], scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as `dtype` (what the kernel multiplies by, up to its activation rounding)."""
        if self.isa is not None and self.weight_int4.device.type == "cpu":  # one vectorised pass, fp32 out
            w = torch.ops.openmedgemma.int4_dequant(self.weight_int4, self.scale, self.out_features, self.in_features)
            return w.to(dtype)
        q, scale = unpack_int4(self.weight_int4, self.scale, self.out_features)
        w = q.to(dtype).view(self.out_features, -1, GROUP) * scale.to(dtype)[:, :, None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    @staticmethod
    def group_forward(layers: tuple[Int4Linear, ...], x: torch.Tensor) -> torch.Tensor | None:
        """Layers of one group (same input, e.g. q, k, v) in one kernel call: their outputs side by side, as
        `model.gemma3.project` concatenates them; None where the kernel does not run them (then each layer runs)."""
        if layers[0].isa is None or x.device.type != "cpu":
            return None
        lead = x.shape[:-1]
        y = torch.ops.openmedgemma.int4_gemv_group(native.kernel_rows(x, layers[0].in_features),
                                                   [m.weight_int4 for m in layers], [m.scale for m in layers],
                                                   [m.out_features for m in layers])  # fmt: skip
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.isa is not None and x.device.type == "cpu":
            y = int4_gemv(native.kernel_rows(x2, self.in_features), self.weight_int4, self.scale, self.out_features)
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.reshape(*lead, self.out_features)
