"""The `4b` text shape (random weights of the true shapes) in int4 on CPU: quantize from bf16, memory, decode.

    python benchmarks/int4_4b.py [--mode int4] [--prompt 16] [--new 16] [--threads 1]

Builds the decoder in bf16 (as a bf16 checkpoint loads), quantizes it in place with `quantize(model, mode)`
plus the quantized head, and reports: the bf16 resident size, the peak resident memory while quantizing
(VmHWM: the bf16 model plus per-slice temporaries, never an fp32 copy of the model), the resident size
after, and greedy decode tokens/s with the quantized head.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from generate import _proc_status  # noqa: E402
from machine import describe  # noqa: E402

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.config import MedGemmaConfig, get_config  # noqa: E402
from openmedgemma.engine import GenerationConfig, quantize  # noqa: E402
from openmedgemma.engine.generate import TokenStream  # noqa: E402
from openmedgemma.engine.quant import quantized_head  # noqa: E402


def status(key: str) -> float:
    """A /proc/self/status memory line in GB (VmRSS, VmHWM)."""
    return _proc_status(key) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int4")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    cfg = get_config("4b").text
    t = time.perf_counter()
    with torch.device("meta"):  # rope tables stay on the CPU (RotaryTable): only the parameters are made here
        model = MedGemma(MedGemmaConfig(text=cfg, vision=None)).eval()
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            w = torch.empty(p.shape, dtype=torch.bfloat16)
            w.zero_() if "norm" in type(module).__name__.lower() else w.uniform_(-0.035, 0.035, generator=gen)
            module._parameters[name] = torch.nn.Parameter(w, requires_grad=False)  # std 0.02, as the usual init
    print(f"bf16 model built in {time.perf_counter() - t:.0f} s; resident {status('VmRSS'):.2f} GB")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    t = time.perf_counter()
    quantize(model, args.mode)
    head = quantized_head(model, args.mode)
    print(f"quantized to {args.mode} in {time.perf_counter() - t:.0f} s; "
          f"peak while quantizing {status('VmHWM'):.2f} GB; resident after {status('VmRSS'):.2f} GB")  # fmt: skip
    layer_bytes = sum(b.numel() * b.element_size() for b in model.language_model.layers.buffers())
    head_bytes = sum(b.numel() * b.element_size() for b in head.buffers())
    emb = model.language_model.embed_tokens.weight
    print(f"{args.mode} bytes: decoder linears {layer_bytes / 1e9:.3f} GB, head {head_bytes / 1e9:.3f} GB; "
          f"bf16 embedding (lookups) {emb.numel() * emb.element_size() / 1e9:.3f} GB")  # fmt: skip
    kernel = next((m.kernel for m in model.modules() if hasattr(m, "kernel")), "n/a")
    print(f"kernel: {kernel}")
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=gen).tolist()

    def run(n):
        for _ in TokenStream(model, prompt, [None], GenerationConfig(max_new_tokens=n), head=head, fast=True):
            pass

    run(2)
    Path("/proc/self/clear_refs").write_text("5")
    times = {}
    for n in (1, args.new):
        t = time.perf_counter()
        run(n)
        times[n] = time.perf_counter() - t
    decode = (args.new - 1) / (times[args.new] - times[1])
    print(f"{args.mode}, {args.threads} thread(s): decode {decode:.2f} tok/s, "
          f"prefill {args.prompt / times[1]:.1f} tok/s (TTFT {times[1]:.2f} s); "
          f"peak resident while generating {status('VmHWM'):.2f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
