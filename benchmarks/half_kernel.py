"""The kernel choices for 16-bit weights, per matrix: decode (1 row) and prefill (128 rows) against fp32 BLAS.

    python benchmarks/half_kernel.py [--threads 1] [--repeats 30] [--shapes ...]

Decode: fp32 BLAS (the faster of the [N, K] and [K, N] layouts), the engine's `half_gemv` (bf16 and fp16,
each variant this CPU runs), torch's bf16 `F.linear` (oneDNN; x cast to bf16), and our int8 kernel and
torch's `_weight_int8pack_mm` for the int8 choice. Prefill: fp32 BLAS, the engine's GEMM over the blocks
(`native.blocks_matmul`, fp32 x: what int8 / fp16 / bf16 / fp32 blocks run; each variant this CPU runs), the
16-bit blocks widened to fp32 then BLAS, and a bf16 GEMM (oneDNN; native on AVX-512-BF16 / AMX CPUs). Shapes and the rotation over 4 weights
(so they come from memory) as benchmarks/int8_kernel.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from int8_kernel import SHAPES, timed  # noqa: E402  (benchmarks/int8_kernel.py, next to this file)

from openmedgemma.engine import cpu, half, native  # noqa: E402

ROWS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not half.kernel_available():
        sys.exit("the CPU kernels cannot be built here (see the message above)")
    info = cpu.detect()
    isas = ["avx2", "avx512"] if info.has("avx512") else ["avx2"]
    print(f"CPU {info.describe()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"load average {Path('/proc/loadavg').read_text().split()[:3]}")  # fmt: skip
    print("decode, 1 row, us (x fp32)  |  prefill, 128 rows, us (x fp32)")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=gen) * 0.05 for _ in range(4)]
        w_kn = [w.t().contiguous() for w in ws]
        bf = [native.pack_blocks(w.bfloat16()) for w in ws]
        fp = [native.pack_blocks(w.half()) for w in ws]
        dense_bf = [w.bfloat16() for w in ws]
        q = [(w / w.abs().amax(1, keepdim=True) * 127).round().to(torch.int8) for w in ws]
        qb = [native.pack_blocks(w) for w in q]
        scale, x, xs = torch.rand(n, generator=gen), torch.randn(1, k, generator=gen), torch.randn(ROWS, k)
        turn = iter(range(10**9))

        def pick(items):
            return items[next(turn) % 4]

        def widen(blocks, dtype):
            b = pick(blocks)
            return torch.empty(k, b.shape[0], 32, dtype=dtype).copy_(b.permute(1, 0, 2)).view(k, -1)

        r = args.repeats
        fp32 = min(timed(lambda: x @ pick(ws).t(), r), timed(lambda: x @ pick(w_kn), r))
        dec = {f"bf16 {isa}": timed(lambda isa=isa: half.half_gemv(x, pick(bf), n, isa), r) for isa in isas}
        dec |= {f"fp16 {isa}": timed(lambda isa=isa: half.half_gemv(x, pick(fp), n, isa), r) for isa in isas}
        dec["torch bf16 linear"] = timed(lambda: F.linear(x.bfloat16(), pick(dense_bf)).float(), r)
        dec["int8 ours"] = timed(lambda: native.int8_gemv(x, pick(qb), scale, n), r)
        dec["torch int8pack"] = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, pick(q), scale), max(3, r // 5))
        pr = max(3, r // 5)
        pre32 = timed(lambda: xs @ pick(w_kn), pr)
        b32 = [native.pack_blocks(w) for w in ws]
        gemm = torch.ops.openmedgemma.blocks_matmul
        pre = {f"blocks GEMM {label} {isa}": timed(lambda b=b, isa=isa: gemm(xs, pick(b), None, n, isa), pr)
               for label, b in (("int8", qb), ("fp16", fp), ("bf16", bf), ("fp32", b32)) for isa in isas}
        pre |= {"widen+BLAS": timed(lambda: xs @ widen(bf, torch.float32), pr),
               "bf16 GEMM": timed(lambda: (xs.bfloat16() @ widen(bf, torch.bfloat16)).float(), pr)}  # fmt: skip
        cells = " ".join(f"{label} {t * 1e6:.0f} ({fp32 / t:.2f})" for label, t in dec.items())
        prefill = " ".join(f"{label} {t * 1e6:.0f} ({pre32 / t:.2f})" for label, t in pre.items())
        print(f"{name} {n}x{k}: fp32 {fp32 * 1e6:.0f} | {cells} | fp32 {pre32 * 1e6:.0f} | {prefill}", flush=True)


if __name__ == "__main__":
    main()
