"""One decode matmul (1 row) per weight shape: fp32 BLAS vs the engine's int8 kernel (both variants) vs torch's.

    python benchmarks/int8_kernel.py [--threads 1] [--repeats 50]

Shapes are the ~130M benchmark config's (q|k|v fused, gate|up fused, down, head) and the `4b` decoder's.
Each variant cycles through 6 different weights of its shape, so weights come from memory as in a real
decode step (the 4b shapes do not fit in cache anyway). fp32 is timed in both layouts ([N, K] as
nn.Linear holds it, [K, N] as `engine/fast.py` packs it) and the faster is the reference. Also checks
the int8 kernel against a float64 product of the same int8 weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from generate import text_config  # noqa: E402  (benchmarks/generate.py, next to this file)

from openmedgemma.engine import native  # noqa: E402


def decode_shapes(name: str, head: bool) -> dict[str, tuple[int, int]]:
    """name: (N, K) of one decoder layer's fused matmuls (as engine/fast.py packs them), with `head` the output head."""
    cfg = text_config(name)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {f"{name} q|k|v": (qkv, cfg.hidden_size), f"{name} gate|up": (2 * cfg.intermediate_size, cfg.hidden_size),
              f"{name} down": (cfg.hidden_size, cfg.intermediate_size)}  # fmt: skip
    if head:
        shapes[f"{name} head"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


# no 4b head (262208 x 2560): its six fp32 copies in both layouts would take 32 GB
SHAPES = {**decode_shapes("130m", head=True), **decode_shapes("4b", head=False)}


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.int8_gemv_available():
        sys.exit("the int8 kernel cannot be built here (see the message above)")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)")
    best = torch.ops.openmedgemma.int8_best_isa()
    print(f"int8 ours: the {best} variant (what this CPU runs); ours avx2: the AVX2 one, for comparison")
    print(f"{'shape':<14}{'N x K':>13}{'fp32 us':>10}{'int8 ours us':>14}{'GB/s':>7}{'x fp32':>8}{'ours avx2 us':>14}"
          f"{'torch int8 us':>15}{'x fp32':>8}{'max rel err':>13}")  # fmt: skip
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        q = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen) for _ in range(6)]
        blocks = [native.pack_blocks(w) for w in q]
        w_nk = [w.float() for w in q]
        w_kn = [w.t().contiguous() for w in w_nk]
        scale, x = torch.rand(n, generator=gen), torch.randn(1, k, generator=gen)
        turn = iter(range(10**9))

        def pick(ws):
            return ws[next(turn) % 6]

        fp32 = min(timed(lambda: x @ pick(w_nk).t(), args.repeats), timed(lambda: x @ pick(w_kn), args.repeats))
        ours = timed(lambda: native.int8_gemv(x, pick(blocks), scale, n), args.repeats)
        avx2 = timed(lambda: native.int8_gemv(x, pick(blocks), scale, n, "avx2"), args.repeats)
        theirs = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, pick(q), scale), max(5, args.repeats // 5))
        ref = (x.double() @ q[0].double().t()) * scale.double()
        err = float((native.int8_gemv(x, blocks[0], scale, n) - ref).abs().max() / ref.abs().max())
        del w_nk, w_kn
        print(f"{name:<14}{f'{n}x{k}':>13}{fp32 * 1e6:>10.0f}{ours * 1e6:>14.0f}{n * k / ours / 1e9:>7.1f}"
              f"{fp32 / ours:>8.2f}{avx2 * 1e6:>14.0f}{theirs * 1e6:>15.0f}{fp32 / theirs:>8.2f}"
              f"{err:>13.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
