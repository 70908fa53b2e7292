"""One decode matmul (1 row) per weight shape: fp32 BLAS vs int8 ours vs int4 ours vs torch's int4 kernel.

    python benchmarks/int4_kernel.py [--threads 1,2] [--repeats 50] [--shapes ...]

Shapes as `benchmarks/int8_kernel.py` (130M fused q|k|v, gate|up, down, head; the `4b` decoder's). Each
variant cycles through 6 different weights of its shape, so weights come from memory as in a decode step.
int4 ours is timed with the variant this CPU picks (auto) and with AVX2 forced; torch's int4 is
`_weight_int4pack_mm_for_cpu` (groups of 32 and 128, fp32 and bf16 activations, with zero points).
GB/s counts the bytes of weight each reads: fp32 4, int8 1, int4 0.5625 per weight (scales included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from int8_kernel import SHAPES, timed  # noqa: E402  (benchmarks/int8_kernel.py, next to this file)
from machine import describe  # noqa: E402

from openmedgemma.engine import native  # noqa: E402
from openmedgemma.engine.int4 import CHUNK, GROUP, int4_gemv, kernel_isa  # noqa: E402

COPIES = 6


def variants(n: int, k: int, gen: torch.Generator) -> dict:
    """name -> (fn taking the copy index, bytes of weight it reads)."""
    nb, g = -(-n // 32), -(-k // GROUP)
    x = torch.randn(1, k, generator=gen)
    xb = x.bfloat16()
    w_nk = [torch.randn(n, k, generator=gen) for _ in range(COPIES)]
    w_kn = [w.t().contiguous() for w in w_nk]
    q8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen) for _ in range(COPIES)]
    b8 = [native.pack_blocks(q) for q in q8]
    s8 = torch.rand(n, generator=gen)
    del q8
    p4 = [torch.randint(0, 256, (nb, g, CHUNK), dtype=torch.uint8, generator=gen) for _ in range(COPIES)]
    s4 = (torch.rand(nb, g, 32, generator=gen) * 0.01).half()
    out = {
        "fp32 [N,K]": (lambda i: x @ w_nk[i].t(), 4 * n * k),
        "fp32 [K,N]": (lambda i: x @ w_kn[i], 4 * n * k),
        "int8 ours": (lambda i: native.int8_gemv(x, b8[i], s8, n), n * k),
        "int4 ours": (lambda i: int4_gemv(x, p4[i], s4, n), n * k // 2 + 2 * nb * 32 * g),
        "int4 ours avx2": (lambda i: int4_gemv(x, p4[i], s4, n, "avx2"), n * k // 2 + 2 * nb * 32 * g),
    }
    t4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32,
                                                                           generator=gen), 8)
          for _ in range(COPIES)]  # fmt: skip
    for group in (32, 128):
        sz = torch.rand(k // group, n, 2, generator=gen)
        for dtype, xx in (("fp32", x), ("bf16", xb)):
            szd = sz.to(xx.dtype)
            out[f"torch int4 g{group} {dtype}"] = (
                lambda i, xx=xx, szd=szd, group=group: torch.ops.aten._weight_int4pack_mm_for_cpu(xx, t4[i], group,
                                                                                                   szd),
                n * k // 2 + 2 * 2 * n * k // group)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    args = parser.parse_args()
    if kernel_isa() is None:
        sys.exit("the CPU kernels cannot be built here (see the message above)")
    print(describe())
    print(f"int4 ours picks: {kernel_isa()}; load average {open('/proc/loadavg').read().split()[:3]}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        table = variants(n, k, torch.Generator().manual_seed(0))
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            print(f"-- {name} ({n} x {k}), {threads} thread(s)")
            results = {}
            for label, (fn, nbytes) in table.items():
                turn = iter(range(10**9))
                results[label] = (timed(lambda fn=fn: fn(next(turn) % COPIES), args.repeats), nbytes)
            fp32 = min(results["fp32 [N,K]"][0], results["fp32 [K,N]"][0])
            for label, (t, nbytes) in results.items():
                print(f"   {label:<22}{t * 1e6:>9.0f} us {nbytes / t / 1e9:>6.1f} GB/s {fp32 / t:>6.2f}x fp32")
        del table


if __name__ == "__main__":
    main()
