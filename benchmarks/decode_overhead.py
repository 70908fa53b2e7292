"""What the per-call savings of a decode step are worth, in one run: the same quantized model with and without them.

    python benchmarks/decode_overhead.py [--mode int4] [--shape 130m] [--threads 1] [--repeats 7] [--compile]

Variants (each its own copy of the same random weights, timed alternately, medians of --repeats):
  - "each layer": q, k, v and gate, up run one kernel call per layer (no `GroupedLayers`), norms as torch ops,
    attention through torch's SDPA;
  - "grouped": one call per group (`engine.fast.GroupedLayers`);
  - "grouped + norm op": also `native.rms_norm` on every norm of an fp32 decoder;
  - "grouped + norm + attention ops": what the engine runs eagerly (also `native.decode_attention`);
  - with --compile, the engine's compiled decode step, compiled before the timing: "torch.compile"
    (`Engine(compile="dynamo")`) and "ahead of time" (`Engine(compile=True)` on a CPU: `engine.aot`).
Decode = (time of 129 new tokens - time of 1) / 128 after a 128-token prompt, greedy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from generate import _ours_runner, build, ours_setup  # noqa: E402
from machine import describe  # noqa: E402

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.engine.fast import DecoderRunner, _norms  # noqa: E402


def runner(folder, prompt, mode: str, variant: str):
    model = MedGemma.from_pretrained(folder)
    head, _ = ours_setup(model, f"ours-{mode}")
    compile = {"torch.compile": "dynamo", "ahead of time": True}.get(variant, False)
    decoder = DecoderRunner(model.language_model, compile=compile)
    lm = model.language_model
    if variant in ("each layer", "grouped", "grouped + norm op"):
        for layer in lm.layers:
            layer.self_attn.attend = None
    if variant in ("each layer", "grouped"):
        for norm in _norms(lm):
            norm.fused = None
    if variant == "each layer":
        for layer in lm.layers:
            layer.self_attn.qkv_kernel = layer.mlp.gate_up_kernel = None
    run = _ours_runner(model, prompt, head, decoder)
    run(3), run(130)  # warm-up (and, compiled, the compile itself)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int4", help="a weight format of engine.quant.MODES (default int4)")
    parser.add_argument("--shape", default="130m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also the compiled decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    variants = ["each layer", "grouped", "grouped + norm op", "grouped + norm + attention ops"]
    variants += ["torch.compile", "ahead of time"] if args.compile else []
    with tempfile.TemporaryDirectory() as folder:
        _, cfg = build(args.shape, torch.float32, "cpu", Path(folder))
        prompt = torch.randint(3, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()
        runs = {v: runner(folder, prompt, args.mode, v) for v in variants}
        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, run in runs.items():
                t = time.perf_counter()
                run(1)
                first = time.perf_counter() - t
                t = time.perf_counter()
                run(129)
                times[v].append((time.perf_counter() - t - first) / 128)
    base = statistics.median(times[variants[0]])
    print(f"-- {args.shape} {args.mode}, {args.threads} thread(s), 128-token prompt, 128 new tokens, medians of "
          f"{args.repeats}")  # fmt: skip
    print(f"{'variant':<32}{'ms / token':>12}{'tok/s':>8}{'x each layer':>14}")
    for v in variants:
        m = statistics.median(times[v])
        print(f"{v:<32}{m * 1e3:>12.2f}{1 / m:>8.1f}{base / m:>14.2f}")


if __name__ == "__main__":
    main()
