"""What 2 MB pages are worth to decode, in one run: the same weights on huge pages and on 4 KB pages.

    python benchmarks/hugepages.py [--modes int8,int4] [--shape 130m] [--threads 1] [--repeats 4] [--compile]

1. Streaming: torch's sum over 256 MB of fp32, in memory advised for huge pages (`engine.hugepages`) and in
   torch's own allocation, alternating (GB/s, medians).
2. Decode: for each mode, two copies of one random model quantized by `quantize` (which gathers the weights into
   huge pages); in the second the quantized layers' buffers and the head are cloned back into torch's ordinary
   memory. Timed alternately: (time of 65 new tokens - time of 1) / 64 after a 128-token prompt, greedy, medians.
Prints the machine, the system's transparent huge page mode and how many bytes the kernel really put on huge
pages (AnonHugePages): where it gave none, both variants are the same memory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from generate import _ours_runner, build  # noqa: E402
from machine import describe  # noqa: E402

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.engine import hugepages, quantize  # noqa: E402
from openmedgemma.engine.fast import DecoderRunner  # noqa: E402
from openmedgemma.engine.quant import QUANTIZED, quantized_head  # noqa: E402


def anon_huge_mb() -> float:
    for line in open("/proc/self/smaps_rollup", encoding="ascii"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


def streaming(repeats: int) -> None:
    plain = torch.ones(64 << 20)
    holder = torch.nn.Module()
    holder.register_buffer("x", torch.ones(64 << 20))
    hugepages.gather([holder])
    rates = {"huge pages": [], "4 KB pages": []}
    for _ in range(repeats * 3):
        for label, x in (("huge pages", holder.x), ("4 KB pages", plain)):
            start = time.perf_counter()
            x.sum()
            rates[label].append(x.nbytes / (time.perf_counter() - start) / 1e9)
    print("sum over 256 MB fp32: " + ", ".join(f"{k} {statistics.median(v):.1f} GB/s" for k, v in rates.items()))


def to_small_pages(model, head) -> None:
    for module in [*model.language_model.layers.modules(), head]:
        if isinstance(module, QUANTIZED):
            for name, t in list(module._buffers.items()):
                if t is not None:
                    module._buffers[name] = t.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="int8,int4", help="weight formats of engine.quant.MODES")
    parser.add_argument("--shape", default="130m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="the engine's compiled decode step (compiled first)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{describe()}; transparent huge pages: {hugepages.mode() or 'none'}")
    streaming(args.repeats)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        build(args.shape, torch.float32, "cpu", Path(folder))
        base = MedGemma.from_pretrained(folder)
        prompt = [torch.randint(3, 30000, (128,), generator=torch.Generator().manual_seed(0)).tolist()]
        for mode in args.modes.split(","):
            for label in ("huge pages", "4 KB pages"):
                model = copy.deepcopy(base)
                quantize(model, mode)
                head = quantized_head(model, mode)
                if label == "4 KB pages":
                    to_small_pages(model, head)
                decoder = DecoderRunner(model.language_model, compile=True) if args.compile else True
                runs[f"{mode}, {label}"] = run = _ours_runner(model, prompt, head, decoder)
                run(3)  # warm-up (and the compile)
    print(f"AnonHugePages of this process: {anon_huge_mb():.0f} MB")
    rates = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run(1)
            first = time.perf_counter() - start
            start = time.perf_counter()
            run(65)
            rates[label].append(64 / (time.perf_counter() - start - first))
    compiled = "compiled" if args.compile else "eager"
    for label, v in rates.items():
        print(f"{args.shape} {label}, {compiled}, {args.threads} thread(s): decode {statistics.median(v):.1f} tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r in v)})")  # fmt: skip


if __name__ == "__main__":
    main()
