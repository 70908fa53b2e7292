"""The engine's compiled CPU kernels (`SOURCES`): built once on this machine, then loaded from a cache.

Weight-only int8 decode on CPU needs a matrix-vector product that reads the int8 weights directly;
torch has one only for AVX-512 CPUs. The kernel is C++ against torch's own headers and libraries
(so it runs on torch's thread pool and is a real torch op, `torch.ops.openmedgemma.int8_gemv`, which
torch.compile can trace). Every kernel source in `SOURCES` (each registers its ops with
`TORCH_LIBRARY_FRAGMENT(openmedgemma, m)`) goes into one library, built with the system C++ compiler
the first time a kernel is needed (~15 s) into
`$OPENMEDGEMMA_CACHE` (default `$XDG_CACHE_HOME/openmedgemma`, else `~/.cache/openmedgemma`) and reused
by every later process. Nothing is downloaded. Where it cannot be built or run (no compiler, a CPU
without AVX2, not x86-64, `OPENMEDGEMMA_NATIVE=0`), `int8_gemv_available()` is False, says why once,
and callers keep torch's kernels.

Weights for the kernel are held in blocks of 32 output channels: `pack_blocks` / `unpack_blocks`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from openmedgemma.engine import cpu, hugepages

KERNELS = ("int8_gemv.cpp", "half_gemv.cpp", "int4_gemv.cpp", "rms_norm.cpp", "gelu_mul.cpp", "attention.cpp",
           "blocks.cpp")  # one library, each registers its own ops
SOURCES = tuple(Path(__file__).with_name(name) for name in KERNELS)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("gemv_group.h", "widen.h"))  # included by the sources: part of the build's cache key
ACTIVATIONS = (torch.float32, torch.bfloat16)  # what the pointwise kernels take (and return)
BLOCK = 32  # output channels per block: kBlock in int8_gemv.cpp
LOADED: Path | None = None  # the library file this process loaded (its name hashes the sources), if any


class NativeBuildError(RuntimeError):
    pass


def pack_blocks(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [ceil(N / 32), K, 32]: each block's 32 weights of one input adjacent (rows past N zero)."""
    n, k = q.shape
    pad = -n % BLOCK
    blocks = F.pad(q, (0, 0, 0, pad)).view(-1, BLOCK, k).transpose(1, 2)
    out = hugepages.empty(blocks.shape, q.dtype) if q.device.type == "cpu" else torch.empty_like(blocks)
    return out.copy_(blocks)  # in a `hugepages.arena`, on huge pages


def unpack_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_blocks`: [ceil(N / 32), K, 32] -> [N, K] (a copy)."""
    return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:n]


WIDEN_BYTES = 3 << 19  # bf16 columns made per GEMM: ~1.5 MB, so they are read back from the caches


def blocks_matmul(x: torch.Tensor, blocks: torch.Tensor, n: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times blocked weights [B, K, 32] (int8 / fp16 / bf16 / fp32), times `scale` [n] per output if given
    -> [M, n] in x's dtype, for prefill. fp32 x on CPU: `blocks.cpp`'s GEMM, which widens each block's weights for
    256 inputs once into an L1-sized fp32 panel, multiplies it in register tiles (12 rows x 32 outputs with
    AVX-512, 6 x 16 with AVX2) and so reads the blocks as they lie: at the 130M shapes, 128 rows, 0.8-1.4x the
    speed of MKL's sgemm on the same weight in fp32 at 1 thread, 1.1-2.1x at 2 (benchmarks/RESULTS.md); the
    batched matmuls over the blocks it replaced ran at 0.70-1.04x, widening the whole weight to [K, N] first less.
    Other x (bf16 activations, a model loaded in bf16): oneDNN's GEMM on a few blocks' columns at a time, which
    is 2-3x a bf16 batched matmul over the blocks, and all columns at once was 2.4x slower at 4b."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        s = None if scale is None else scale.float().contiguous()
        return torch.ops.openmedgemma.blocks_matmul(x.contiguous(), blocks, s, n, cpu.detect().vector_isa)
    m = x.shape[0]
    step = max(1, WIDEN_BYTES // (x.shape[1] * blocks.shape[2] * x.element_size()))  # blocks per GEMM
    y = x.new_empty(m, blocks.shape[0] * blocks.shape[2])
    for first in range(0, blocks.shape[0], step):
        columns = blocks_to_columns(blocks[first : first + step], x.dtype)
        y[:, first * blocks.shape[2] : first * blocks.shape[2] + columns.shape[1]] = x @ columns
    return y[:, :n] if scale is None else y[:, :n] * scale.to(x.dtype)


def blocks_to_columns(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks [B, K, 32] -> [K, B * 32] in `dtype` (columns past N are the blocks' zero padding): the operand
    oneDNN's bf16 GEMM reads fastest (2-3x a batched bf16 matmul over the blocks)."""
    if dtype == torch.bfloat16 and blocks.device.type == "cpu" and blocks.is_contiguous() and LOADED is not None and (
        blocks.dtype in (torch.int8, torch.bfloat16)
    ):
        return torch.ops.openmedgemma.blocks_to_bf16_columns(blocks)  # blocks.cpp: one parallel pass
    k = blocks.shape[1]
    dense = torch.empty(k, blocks.shape[0], blocks.shape[2], dtype=dtype, device=blocks.device)
    return dense.copy_(blocks.permute(1, 0, 2)).view(k, -1)


def kernel_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as the contiguous rows [M, k] the gemv kernels take: fp32 or bf16 as it is (they return y in its dtype,
    rounding each output once as a conversion after them would), other dtypes as fp32."""
    x2 = x.reshape(-1, k)
    return (x2 if x2.dtype in ACTIVATIONS else x2.float()).contiguous()


def int8_gemv(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, n: int, isa: str = "auto") -> torch.Tensor:
    """fp32 x [M, K] times the blocked int8 weight, times scale [N] -> fp32 [M, N] (needs `int8_gemv_available()`).

    x is rounded to int16 per group of 256 inputs first (int8_gemv.cpp); isa forces a variant ("avx2",
    "avx512vnni"; both give the same bits), "auto" takes the best this CPU has."""
    return torch.ops.openmedgemma.int8_gemv(x, blocks, scale, n, isa)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The decoder norms' kernel (`rms_norm.cpp`; engine.fast installs it): contiguous fp32 or bf16 CPU x, else None."""
    if x.dtype not in ACTIVATIONS or gain.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    return torch.ops.openmedgemma.rms_norm(x, gain, eps)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """The MLP's gelu_tanh(gate) * up from the gate|up projection [..., 2 I] (`gelu_mul.cpp`; engine.fast installs
    it): contiguous fp32 or bf16 CPU input, else None."""
    if gate_up.dtype not in ACTIVATIONS or gate_up.device.type != "cpu" or not gate_up.is_contiguous():
        return None
    return torch.ops.openmedgemma.gelu_tanh_mul(gate_up)


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor | None:
    """Attention of one query per row over the cache (`attention.cpp`; engine.fast installs it): CPU
    q [B, Hq, 1, D], k / v [B, Hkv, S, D], all fp32 or all bf16 (a bf16 cache is widened as it is read, a bf16 q
    widened in the op; the result is rounded to bf16 once), mask None or boolean [1 or B, 1, 1, S]; else None
    (SDPA runs). For bf16, torch's SDPA took ~0.3 ms per layer at 4b (4 KV heads of 256, ~100 keys): ~10 ms of a
    ~140 ms decode step."""
    if q.shape[2] != 1 or q.device.type != "cpu" or q.dtype not in ACTIVATIONS:
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    return torch.ops.openmedgemma.decode_attention(q, k, v, mask, scale)  # in q's dtype


def cache_dir() -> Path:
    root = os.environ.get("OPENMEDGEMMA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "openmedgemma"
    return Path(root).expanduser() / "kernels"


@functools.cache
def int8_gemv_available() -> bool:
    """Load the kernel, building it first if this machine has no cached build; False (said once) if it cannot."""
    global LOADED
    reason = _unsupported()
    if reason is None:
        try:
            path = _build()
            torch.ops.load_library(str(path))
            LOADED = path
        except (NativeBuildError, OSError, RuntimeError) as err:
            reason = str(err)
    if reason is not None:
        print(f"openmedgemma: the int8 CPU kernel is not used ({reason}); int8 decode on CPU falls back to "
              "torch's kernel, which is slower than fp32 on CPUs without AVX-512", file=sys.stderr)  # fmt: skip
        return False
    torch.library.register_fake("openmedgemma::int8_gemv")(_fake)
    torch.library.register_fake("openmedgemma::rms_norm")(lambda x, gain, eps: torch.empty_like(x))
    torch.library.register_fake("openmedgemma::gelu_tanh_mul")(
        lambda gate_up: gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2)))
    torch.library.register_fake("openmedgemma::decode_attention")(lambda q, k, v, mask, scale: q.new_empty(q.shape))
    torch.library.register_fake("openmedgemma::blocks_matmul")(lambda x, w, scale, n, isa: x.new_empty((x.shape[0], n)))
    torch.library.register_fake("openmedgemma::int8_gemv_group")(
        lambda x, w, scale, n, isa="auto": x.new_empty((x.shape[0], sum(n))))
    return True


def _fake(x, blocks, scale, n, isa="auto"):  # output shape for torch.compile's tracing
    return x.new_empty((x.shape[0], n))


def _unsupported() -> str | None:
    if os.environ.get("OPENMEDGEMMA_NATIVE", "1") == "0":
        return "OPENMEDGEMMA_NATIVE=0"
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 Linux / macOS, this is {sys.platform} {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2 (torch reports {capability})"
    return None


def _build() -> Path:
    """The cached shared library for this source, torch and compiler; compiled now if missing."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++20", "-shared", "-fPIC", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
             f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]  # fmt: skip
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]  # Apple clang has no OpenMP: at::parallel_for runs serially
    else:
        flags.append("-fopenmp")  # at::parallel_for inlines OpenMP; libgomp.so.1 resolves to torch's, loaded
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS)
                         + repr((torch.__version__, str(torch_dir), cxx, flags)).encode())  # fmt: skip
    target = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError
    except OSError:  # e.g. a read-only home: build for this process only
        target = Path(tempfile.mkdtemp(prefix="openmedgemma-kernels-")) / target.name
    print(f"openmedgemma: building the CPU kernels (once, ~15 s) into {target.parent}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # build beside, then rename: atomic for
    os.close(fd)  # several processes building at once
    try:
        done = subprocess.run([cxx, *map(str, SOURCES), "-o", tmp, *flags], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if done.returncode != 0:
            tail = " ".join(done.stderr.strip().splitlines()[-3:])
            names = ", ".join(s.name for s in SOURCES)
            raise NativeBuildError(f"{cxx} failed to compile {names}: {tail[-500:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NativeBuildError(f"could not run {cxx}: {err}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
