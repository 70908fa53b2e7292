"""What this CPU can run, read at run time, and the kernel choices that follow from it.

The weight formats (`engine/quant.py`, `engine/half.py`) pick their CPU kernels from these features, so
one install runs at its best on an AVX2-only EPYC, an AVX-512 EPYC with BF16, or a Xeon with AMX:
  - AVX2 + FMA (+ F16C): the engine's own kernels (`engine/native.py`) build and run;
  - AVX-512F/BW: torch's `_weight_int8pack_mm` is vectorised (it is scalar-slow below AVX-512);
  - AVX-512-BF16 or AMX-BF16: bf16 multiplies run in hardware, so oneDNN's bf16 matmuls are fast;
  - AVX-512-VNNI / AMX-INT8: int8 dot products in hardware (reported; fbgemm and oneDNN use them).
Flags come from /proc/cpuinfo (`dtype.cpu_flags`; empty off Linux, where every helper answers False and
the portable paths are kept) and torch's own view (`torch.backends.cpu.get_cpu_capability()`, e.g.
"AVX2" / "AVX512"), which also says what torch's vectorised kernels were dispatched to.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from openmedgemma.engine.dtype import cpu_flags

# name shown -> the /proc/cpuinfo flags that must all be present
FEATURES = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512": ("avx512f", "avx512bw"),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni",),
    "amx_bf16": ("amx_bf16", "amx_tile"),
    "amx_int8": ("amx_int8", "amx_tile"),
}


@dataclass(frozen=True)
class CPU:
    """A CPU's model name, its features (keys of FEATURES) and torch's dispatch level."""

    model: str
    features: frozenset[str]
    torch_capability: str = ""

    @classmethod
    def from_flags(cls, flags: set[str], model: str = "", torch_capability: str = "") -> CPU:
        have = frozenset(name for name, needs in FEATURES.items() if all(f in flags for f in needs))
        return cls(model, have, torch_capability)

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise KeyError(f"unknown CPU feature {feature!r}; known: {', '.join(FEATURES)}")
        return feature in self.features

    @property
    def native_bf16(self) -> bool:
        """bf16 multiplies in hardware (AVX-512-BF16 or AMX-BF16): same rule as `dtype.cpu_has_native_bf16`."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def avx2_kernels(self) -> bool:
        """The engine's own kernels can run (they are written for AVX2 + FMA + F16C)."""
        return all(self.has(f) for f in ("avx2", "fma", "f16c"))

    @property
    def vector_isa(self) -> str:
        """The variant of the engine's own kernels to run: "avx512" (16 fp32 per register) with AVX-512F/BW, else "avx2"."""
        return "avx512" if self.has("avx512") else "avx2"

    def why(self, *features: str) -> str:
        """'avx512_bf16 yes, amx_bf16 no': the features a choice was made on, for the one-line notices."""
        return ", ".join(f"{f} {'yes' if self.has(f) else 'no'}" for f in features)

    def describe(self) -> str:
        """One line for benchmarks and notices: model name, the features that matter, torch's dispatch level."""
        shown = [f for f in FEATURES if f in self.features] or ["none of " + "/".join(FEATURES)]
        torch_part = f"; torch dispatch {self.torch_capability}" if self.torch_capability else ""
        return f"{self.model or platform.processor() or platform.machine()}: {' '.join(shown)}{torch_part}"


def _model_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


@functools.cache
def detect() -> CPU:
    """This machine's CPU (read once per process)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    flags = cpu_flags(cpuinfo) if cpuinfo else set()
    return CPU.from_flags(flags, _model_name(cpuinfo), torch.backends.cpu.get_cpu_capability())

