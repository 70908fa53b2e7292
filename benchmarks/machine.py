"""The machine a benchmark ran on, printed with every figure: CPU model, the instruction sets that pick
kernels (AVX2, AVX-512, AVX-512-BF16, AMX), cores, torch and its threads, the GPU if any."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in have]


def describe() -> str:
    import torch

    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()} ({os.cpu_count()} cores; flags: {' '.join(cpu_flags()) or 'none of ' + ','.join(FLAGS)}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")  # fmt: skip
