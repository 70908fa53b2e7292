"""Int8 weights for the decoder: symmetric, one scale per output channel, chosen at load.

`quantize(model, "int8")` replaces every linear layer of the decoder (q, k, v, o, gate, up, down) by
`Int8Linear` in place. Weight-only: activations stay in the model dtype, y = (x @ q.T) * scale.
  - CPU, decode (a few rows): the engine's kernel (`int8_gemv.cpp`, built once on first use; AVX2, or
    AVX-512 VNNI where the CPU has it), which streams the int8 weights, held in blocks of 32 output
    channels, at close to the memory bandwidth. It rounds x to int16 per group of 256 inputs (2^-16 of
    the group's largest value, 256x finer than bf16) so that the products are integer ones.
    Where it cannot be built, torch's `_weight_int8pack_mm` (fast on AVX-512 only).
    Prefill (many rows): the engine's GEMM over the same blocks (`native.blocks_matmul`: each block's panel
    widened to fp32 in the L1, then register tiles): 0.8-1.4x the speed of fp32 BLAS at 1 thread, 1.1-2.1x at 2.
  - other devices: dequantize then matmul (`F.linear(x, q.to(x.dtype)) * scale`), which saves
    memory but not time unless fused by torch.compile.
`quantize(model, "int8-dynamic")` (CPU only) stores the same int8 weights but runs them with
fbgemm's dynamic kernel: each call also quantizes the activations to int8 (per tensor, 7-bit on
x86), which is fast on any x86 CPU and a little lossier than weight-only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.engine import cpu, hugepages, native
from openmedgemma.engine.half import HalfLinear
from openmedgemma.engine.int4 import Int4Linear
from openmedgemma.errors import OpenMedGemmaError

# mode -> the layer class that replaces an nn.Linear: cls(weight, mode). Each weight format lives in its own
# module and adds itself here (one line); `quantize`, `quantized_head`, Engine and the CLIs read this.
LAYERS: dict[str, type] = {}
# Above this many rows (prefill), a GEMM (which reuses each widened weight for many rows) beats the int8 kernel.
FUSED_MAX_ROWS = 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight(weight: torch.Tensor, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K] in -127..127, float32 scale [N]) with weight ~= q * scale[:, None].

    About `chunk` weights at a time: a bf16 model's matrices (the 4b head is 0.67 G weights) are never
    copied whole to fp32."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    rows = max(1, chunk // max(k, 1))
    for start in range(0, n, rows):
        w = weight[start : start + rows].detach().float()  # any layout (relayout_weights leaves views)
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[start : start + rows] = torch.round(w / s[:, None]).clamp(-127, 127)
        scale[start : start + rows] = s
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights and per-output-channel scales.

    `weight_int8` is [out, in], or on CPU with the native kernel its blocks [ceil(out / 32), in, 32]
    (`native.pack_blocks`); `int8_rows()` gives [out, in] either way.
    """

    def __init__(self, weight: torch.Tensor, mode: str = "int8"):
        super().__init__()
        if mode not in ("int8", "int8-dynamic"):
            raise OpenMedGemmaError(f"unknown int8 mode {mode!r}; use int8 or int8-dynamic")
        q, scale = quantize_weight(weight)
        self.mode = mode
        self.out_features, self.in_features = q.shape
        blocked = mode == "int8" and weight.device.type == "cpu" and native.int8_gemv_available()
        self.register_buffer("weight_int8", (native.pack_blocks(q) if blocked else q).to(weight.device))
        self.register_buffer("scale", scale.to(device=weight.device, dtype=weight.dtype))
        self._packed = _fbgemm_pack(q, scale, weight.device) if mode == "int8-dynamic" else None
        self.kernel = _int8_kernel(mode, weight.device.type == "cpu", blocked)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    @property
    def traceable(self) -> bool:
        """False for int8-dynamic: fbgemm's packed weight is a TorchScript object that torch.export refuses and
        dynamo breaks the graph at (a compiled decode step is then slower than the eager one)."""
        return self._packed is None

    def int8_rows(self) -> torch.Tensor:
        """The int8 weight as [out, in] (a copy if held in blocks)."""
        w = self.weight_int8
        return w if w.dim() == 2 else native.unpack_blocks(w, self.out_features)

    @staticmethod
    def group_forward(layers: tuple[Int8Linear, ...], x: torch.Tensor) -> torch.Tensor | None:
        """Layers of one group (same input, e.g. q, k, v) in one kernel call at decode: their outputs side by side;
        None otherwise (then each layer runs)."""
        x2 = x.reshape(-1, layers[0].in_features)
        first = layers[0]
        blocked = first._packed is None and first.weight_int8.dim() == 3  # the native kernel's layout
        if not blocked or x2.shape[0] > FUSED_MAX_ROWS or x.device.type != "cpu":
            return None
        y = torch.ops.openmedgemma.int8_gemv_group(native.kernel_rows(x, x.shape[-1]), [m.weight_int8 for m in layers],
                                                   [m.scale.float() for m in layers], [m.out_features for m in layers])
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        decode = x.device.type == "cpu" and x2.shape[0] <= FUSED_MAX_ROWS
        if self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, True).to(x.dtype)
        elif decode and self.weight_int8.dim() == 3:
            y = native.int8_gemv(native.kernel_rows(x2, self.in_features), self.weight_int8, self.scale.float(),
                                 self.out_features)  # fmt: skip
            y = y.to(x.dtype)
        elif decode:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale.to(x.dtype))
        else:
            y = self.dequant_matmul(x2)
        return y.reshape(*lead, self.out_features)

    def dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The portable path (any device): dequantize the weight, then an ordinary matmul."""
        w, scale = self.weight_int8, self.scale.to(x.dtype)
        if w.dim() == 2:
            return F.linear(x, w.to(x.dtype)) * scale
        return native.blocks_matmul(x, w, self.out_features, scale)


LAYERS.update({"int8": Int8Linear, "int8-dynamic": Int8Linear})
LAYERS.update(bf16=HalfLinear, fp16=HalfLinear, fp32=HalfLinear)
LAYERS["int4"] = Int4Linear
MODES = tuple(LAYERS)
QUANTIZED = tuple(dict.fromkeys(LAYERS.values()))  # the layer classes


def _int8_kernel(mode: str, on_cpu: bool, blocked: bool) -> str:
    """What runs an Int8Linear, and why (shown once by the Engine).

    Our kernel is chosen on every CPU that can build it: torch's `_weight_int8pack_mm`, vectorised for AVX-512
    only, measured 14-22x slower than ours for 1-row decode on an AVX-512 EPYC too (benchmarks/RESULTS.md,
    "Weight formats on CPU"), so AVX-512 is no reason to prefer it.
    """
    if mode == "int8-dynamic":
        return "fbgemm's dynamic int8 linear (activations quantized to int8 per call)"
    if not on_cpu:
        return "dequantize, then the device's matmul"
    if blocked:
        info = cpu.detect()
        prefill = f"prefill (> {FUSED_MAX_ROWS} rows): blocks GEMM {info.vector_isa} (ours, fp32 panels of the blocks)"
        decode = f"int8_gemv {torch.ops.openmedgemma.int8_best_isa()} (ours, x rounded to int16 per 256 inputs; faster"
        return f"decode: {decode} than torch's _weight_int8pack_mm, {info.why('avx512', 'avx512_vnni')}); {prefill}"
    return f"decode: torch's _weight_int8pack_mm (our kernel could not be built); prefill: dequantize + BLAS"


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, device: torch.device):
    """fbgemm's prepacked int8 weight for `torch.ops.quantized.linear_dynamic` (x86 / ARM CPUs)."""
    if device.type != "cpu":
        raise OpenMedGemmaError("int8-dynamic quantization runs on CPU only; use int8 on GPU")
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch (still there in 2.13)
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, None)
    except (AttributeError, RuntimeError) as err:
        raise OpenMedGemmaError(f"int8-dynamic needs torch's fbgemm quantized ops, which this torch lacks ({err}); "
                                "use quantize='int8'") from None  # fmt: skip


def quantize(model, mode: str = "int8") -> None:
    """Replace the decoder's linear layers of a MedGemma by `LAYERS[mode]`, in place (vision tower untouched); on
    CPU their weights are made, in layer order, in memory advised for huge pages (`hugepages.arena`)."""
    if mode not in MODES:
        raise OpenMedGemmaError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    from openmedgemma.engine.fast import remove_kernels

    remove_kernels(model.language_model)  # they would step aside anyway, but hold on to the float weights
    with hugepages.arena():
        for layer in model.language_model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in LINEARS:
                    module = getattr(parent, name, None)
                    if isinstance(module, nn.Linear):
                        setattr(parent, name, LAYERS[mode](module.weight, mode))
            # what stays of the layer (its norms: a few KB) may be a view of a checkpoint file's mapping, which
            # would keep the whole shard mapped (and its pages resident) after its linear weights are gone
            _own_storage(layer)
            hugepages.trim()  # this layer's temporaries
    _own_storage(model.language_model.norm)


def _own_storage(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.untyped_storage().nbytes() > param.numel() * param.element_size():
                param.data = param.data.clone()


def quantized_head(model, mode: str) -> nn.Module | None:
    """An int8 copy of the tied output head (the embedding table stays as it is for input lookups).

    Only on CPU, where a fused kernel reads the int8 rows directly; elsewhere dequantizing the whole
    vocabulary each step would cost more than it saves, so the model's own head is kept (None).
    """
    weight = model.language_model.embed_tokens.weight
    if weight.device.type != "cpu" or mode == "fp32":  # fp32: a second fp32 table for ~1.2x of one matmul
        return None
    with hugepages.arena():
        head = LAYERS[mode](weight, mode)
    hugepages.trim()
    return head
