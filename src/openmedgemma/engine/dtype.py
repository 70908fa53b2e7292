"""Which dtype `--dtype auto` loads a checkpoint in, and whether an upcast fits in memory.

auto: bfloat16 on a GPU. On a CPU a bfloat16 checkpoint stays bfloat16 where the CPU computes bf16
natively (AMX or AVX-512-BF16); elsewhere float32 (faster there than emulated bf16). A float32 or
float16 checkpoint loads as float32.

An upcast (bf16 / fp16 file -> float32) copies every weight: before it starts, the bytes it needs are
compared with the memory available (RAM, the cgroup's limit and the process's address-space limit),
and a load that cannot fit is refused with one line that names both figures and the ways out, instead
of dying in the allocator halfway through (or sending the machine into swap).
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from openmedgemma.checkpoint import Checkpoint
from openmedgemma.config import read_hf_config
from openmedgemma.errors import CheckpointError

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_GB = 1e9


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX-BF16 or AVX-512-BF16). Where the flags cannot be read
    (not Linux) False: float32, which every CPU runs at full speed, when it fits."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def available_memory() -> int:
    """Bytes this process can still allocate: the least of RAM available, the cgroup's room and the room
    under its address-space limit (RLIMIT_AS, which counts the memory-mapped checkpoint too)."""
    limits = []
    meminfo = _read("/proc/meminfo")
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            limits.append(int(line.split()[1]) * 1024)
    cg_max, cg_now = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if cg_max.isdigit() and cg_now.isdigit():
        limits.append(max(int(cg_max) - int(cg_now), 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(soft - _vm_size(), 0))
    return min(limits) if limits else 1 << 62


def _vm_size() -> int:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def choose_dtype(folder, requested: str, device: str, *, native_bf16: bool | None = None,
                 available: int | None = None) -> str:  # fmt: skip
    """The dtype name to load `folder` in ("float32" / "bfloat16" / the requested one).

    Reads only the safetensors headers. Raises CheckpointError when a float32 upcast would not fit in
    `available` bytes (default: `available_memory()`); the file's own mapping counts against the limit too.
    """
    if requested not in ("auto", "float32", "fp32"):
        return requested
    read_hf_config(Path(folder).expanduser())  # a missing folder or config.json is reported as loading reports it
    ckpt = Checkpoint(folder)
    file_dtype = ckpt.floating_dtype()
    on_gpu = not str(device).startswith("cpu")
    if requested == "auto":
        if on_gpu:
            return "bfloat16"
        if file_dtype == torch.bfloat16 and (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
            return "bfloat16"
    if on_gpu or file_dtype not in (torch.bfloat16, torch.float16):
        return "float32"  # no upcast on the CPU: float32 weights are mapped, not copied
    numel = sum(_numel(ckpt.info(n).shape) for n in ckpt.names() if ckpt.info(n).dtype.is_floating_point)
    needed = numel * 4
    mapped = sum(f.path.stat().st_size for f in ckpt.files)
    room = (available_memory() if available is None else available) - mapped
    if needed > room:
        why = "--dtype auto means float32 on this CPU (no native bf16)" if requested == "auto" else "--dtype float32"
        raise CheckpointError(
            f"{folder}: {why}: upcasting its {_name(file_dtype)} weights needs {needed / _GB:.2f} GB but only "
            f"{max(room, 0) / _GB:.2f} GB of memory is available (after mapping its {mapped / _GB:.2f} GB of "
            f"files); pass --dtype bfloat16 (no copy of the weights), or --dtype bfloat16 --quantize int8 "
            "(int8 decoder weights: less memory still)"
        )
    return "float32"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
