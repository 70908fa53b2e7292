"""The machine a benchmark ran on, printed with every figure: CPU model, the instruction sets that pick
kernels (AVX2, AVX-512, AVX-512-BF16, VNNI, AMX: as `openmedgemma.engine.cpu` reads them for the engine),
cores, torch and its threads, the GPU if any."""

from __future__ import annotations

import os


def cpu_model() -> str:
    from openmedgemma.engine.cpu import detect

    return detect().model or "unknown CPU"


def describe() -> str:
    import torch

    from openmedgemma.engine.cpu import detect

    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{detect().describe()} ({os.cpu_count()} cores); torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")  # fmt: skip
