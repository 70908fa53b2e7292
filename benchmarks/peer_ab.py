"""Ours against llama.cpp at the same bits, in one process, alternating: the firm ratio on a noisy machine.

    python benchmarks/peer_ab.py --work-dir /tmp/peer/4b [--pairs int4:q4_0,int8:q8_0] [--threads 1,2] [--rounds 5]

`generate.py --peer llama.cpp --configs 4b --work-dir DIR` runs each implementation in its own process, and on
a shared machine two processes can differ by 20% with nothing changed. Here both live in one process and take
turns: a generation of each (64-token prompt, 33 new tokens, greedy; decode timed token by token after the
first), half a second apart so llama.cpp's spinning threads have stopped, `--rounds` times; medians and the
ratio. Needs what that run keeps in DIR: the bf16 checkpoint `hf-bf16/` and `model-<format>.gguf`. Ours runs
as `ask` does: loaded in bf16, `quantize(model, mode)` and the quantized head, the decode step uncompiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llama_cpp_peer as P  # noqa: E402
from machine import describe  # noqa: E402

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.engine import GenerationConfig, quantize  # noqa: E402
from openmedgemma.engine.generate import TokenStream  # noqa: E402
from openmedgemma.engine.quant import quantized_head  # noqa: E402


def decode_tok_s(stream, n: int) -> float:
    for i, _ in enumerate(stream(n)):
        if i == 0:
            first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="the --work-dir of a generate.py --peer 4b run")
    parser.add_argument("--pairs", default="int4:q4_0,int8:q8_0", help="ours:llama.cpp formats, comma list")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=33)
    args = parser.parse_args()
    print(describe(), flush=True)
    llama_cpp, _ = P.load()
    ids = torch.randint(3, 262144, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    for pair in args.pairs.split(","):
        mode, fmt = pair.split(":")
        gguf = args.work_dir / f"model-{fmt}.gguf"
        if not gguf.exists() or not (args.work_dir / "hf-bf16").is_dir():
            raise SystemExit(f"{args.work_dir}: no hf-bf16/ or {gguf.name}; run generate.py --peer llama.cpp "
                             f"--configs 4b --work-dir {args.work_dir} first")  # fmt: skip
        model = MedGemma.from_pretrained(args.work_dir / "hf-bf16", dtype=torch.bfloat16)
        quantize(model, mode)
        head = quantized_head(model, mode)
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            peer = P.Peer(llama_cpp, gguf, threads)
            impls = {f"ours {mode}": lambda n: TokenStream(model, [ids], [None], GenerationConfig(max_new_tokens=n),
                                                           head=head, fast=True),  # fmt: skip
                     f"llama.cpp {fmt}": lambda n: peer.stream(ids, n)}  # fmt: skip
            for stream in impls.values():
                decode_tok_s(stream, 3)  # warm-up: lazy initialisation, every weight page read once
            runs = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, stream in impls.items():
                    time.sleep(0.5)
                    runs[name].append(decode_tok_s(stream, args.new))
            medians = {name: statistics.median(v) for name, v in runs.items()}
            for name, v in runs.items():
                print(f"4b, {threads} thread(s), {name}: {medians[name]:.2f} tok/s decode {[round(x, 2) for x in v]}")
            ours, peer_median = medians.values()
            print(f"4b, {threads} thread(s): ours {mode} / llama.cpp {fmt} = {ours / peer_median:.2f}x", flush=True)
            peer.close()
        del model, head


if __name__ == "__main__":
    main()
