"""Serving benchmark (as vLLM's benchmark_serving): a live `openmedgemma serve` under load from the
VQA-RAD questions with their images, over loopback.

    python benchmarks/serve.py                          # ~130M decoder + nano vision tower, fp32, CPU
    python benchmarks/serve.py --config nano --requests 48

Runs, each against a fresh server process: closed-loop clients at fixed concurrency 1 / 4 / 16 / 32
(each client sends its next request when the last one ends; clients start staggered so they are
desynchronised; the first request of each client is warm-up and not counted), a Poisson open loop at
--rate requests/s, and the same concurrency 16 against `--max-batch 1` (no batching). Every request
streams with per-token logprobs, so each token arrives as one SSE chunk: TTFT = arrival -> first token,
TPOT = (e2e - TTFT) / (tokens - 1) per request, ITL = gaps between chunks. Answers have a fixed length
(`ignore_eos`, as vLLM's random-data runs), so throughput compares like with like. The decoder has random
weights of the ~130M shape (benchmarks/generate.py) with nano's vision tower and tokenizer.
Goals (issue 12): output tokens/s at concurrency 16 >= 5x concurrency 1; closed-loop p50 TTFT at
concurrency 4 <= 2x the idle (concurrency 1) p50 TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402

from machine import describe  # noqa: E402

SHAPE_130M = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=128, query_pre_attn_scalar=128)  # fmt: skip


def build_checkpoint(config: str, folder: Path) -> Path:
    """nano as is, or nano's vision tower + tokenizer around a random decoder of the ~130M shape."""
    from openmedgemma.bundled import nano_path

    nano = nano_path("medgemma")
    if config == "nano":
        return nano
    import torch

    from openmedgemma.config import from_hf_config
    from openmedgemma.model.medgemma import MedGemma

    data = json.loads((nano / "config.json").read_text())
    data["text_config"].update(SHAPE_130M, max_position_embeddings=4096)
    data["text_config"].pop("layer_types", None)  # 12 layers: derived again (5 sliding : 1 global)
    torch.manual_seed(0)
    model = MedGemma(from_hf_config(data))
    model.save_pretrained(folder)
    for f in nano.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


def vqa_rad_prompts(data_dir: Path, n: int, seed: int) -> list[list[dict]]:
    root = data_dir / "vqa_rad"
    rows = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    random.Random(seed).shuffle(rows)
    images, prompts = {}, []
    for row in rows[:n]:
        name = row["image_name"]
        if name not in images:
            data = (root / "VQA_RAD Image Folder" / name).read_bytes()
            mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            images[name] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        prompts.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[name]}},
                                                     {"type": "text", "text": row["question"]}]}])  # fmt: skip
    return prompts


class Server:
    def __init__(self, model: Path, *args: str):
        cmd = [sys.executable, "-m", "openmedgemma.cli", "serve", "--model", str(model), "--port", "0",
               "--log-level", "warning", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = re.search(r"(http://\S+)", self.proc.stdout.readline()).group(1)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not load")

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


async def one(client: httpx.AsyncClient, url: str, messages, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 0, "temperature": 0}  # fmt: skip
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("logprobs"):
                stamps += [time.perf_counter()] * len(choices[0]["logprobs"]["content"])
    return dict(start=t0, stamps=stamps)


async def closed_loop(url, prompts, concurrency: int, per_client: int, max_tokens: int) -> tuple[list, float]:
    """Each client: a staggered start, one warm-up request, then `per_client` timed ones."""
    timed, queue = [], list(prompts)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(k):
            await asyncio.sleep(k * 0.05)
            await one(client, url, queue[k % len(queue)], max_tokens)  # warm-up, not counted
            for j in range(per_client):
                timed.append(await one(client, url, queue[(k * per_client + j) % len(queue)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    span = max(r["stamps"][-1] for r in timed) - min(r["start"] for r in timed)
    return timed, span if span > 0 else time.perf_counter() - t0


async def poisson(url, prompts, rate: float, n: int, max_tokens: int, seed: int) -> tuple[list, float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(client, url, prompts[i % len(prompts)], max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return results, max(r["stamps"][-1] for r in results) - min(r["start"] for r in results)


def summarize(results: list[dict], span: float) -> dict:
    ttft = [r["stamps"][0] - r["start"] for r in results]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in results if len(r["stamps"]) > 1]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:]) if b > a]
    tokens = sum(len(r["stamps"]) for r in results)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return dict(requests=len(results), req_s=len(results) / span, out_tok_s=tokens / span,
                ttft_p50=statistics.median(ttft), ttft_p99=pct(ttft, 0.99), tpot_p50=statistics.median(tpot),
                tpot_p99=pct(tpot, 0.99), itl_p50=statistics.median(itl) if itl else float("nan"),
                itl_p99=pct(itl, 0.99))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="130m", choices=["130m", "nano"])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--per-client", type=int, default=3, help="timed requests per closed-loop client")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson requests per second")
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = vqa_rad_prompts(Path(args.data_dir), 256, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(args.config, Path(tmp))
        print(f"machine: {describe()}\nmodel: {args.config} decoder, {args.max_tokens} tokens per answer, "
              f"date {datetime.date.today()}", flush=True)  # fmt: skip
        header = (f"{'run':<26}{'req':>5}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}"
                  f"{'p99':>8}{'ITL p50':>9}{'p99':>8}")  # fmt: skip
        print(header)

        def show(name, res):
            rows[name] = res
            print(f"{name:<26}{res['requests']:>5}{res['req_s']:>8.2f}{res['out_tok_s']:>11.1f}{res['ttft_p50']:>10.3f}"
                  f"{res['ttft_p99']:>8.3f}{res['tpot_p50']:>10.4f}{res['tpot_p99']:>8.4f}{res['itl_p50']:>9.4f}"
                  f"{res['itl_p99']:>8.4f}", flush=True)  # fmt: skip

        for batch_arg, label in (("32", "batched"), ("1", "max-batch 1")):
            server = Server(model, "--max-batch", batch_arg)
            try:
                for c in levels if label == "batched" else [c for c in (1, 16) if c in levels]:
                    res, span = asyncio.run(closed_loop(server.url, prompts, c, args.per_client, args.max_tokens))
                    show(f"{label}, concurrency {c}", summarize(res, span))
                if label == "batched" and args.rate > 0:
                    res, span = asyncio.run(poisson(server.url, prompts, args.rate, args.poisson_requests,
                                                    args.max_tokens, seed=0))  # fmt: skip
                    show(f"{label}, Poisson {args.rate:g}/s", summarize(res, span))
            finally:
                server.close()
    one_ = rows.get("batched, concurrency 1")
    if one_ and "batched, concurrency 16" in rows:
        print(f"\nout tok/s at concurrency 16 / concurrency 1: "
              f"{rows['batched, concurrency 16']['out_tok_s'] / one_['out_tok_s']:.2f}x (goal >= 5x)")
    if one_ and "batched, concurrency 4" in rows:
        print(f"p50 TTFT at concurrency 4 / idle: {rows['batched, concurrency 4']['ttft_p50'] / one_['ttft_p50']:.2f}x "
              f"(goal <= 2x; p99 {rows['batched, concurrency 4']['ttft_p99'] / one_['ttft_p50']:.2f}x)")
    if "max-batch 1, concurrency 16" in rows and "batched, concurrency 16" in rows:
        print(f"continuous batching vs --max-batch 1 at concurrency 16: "
              f"{rows['batched, concurrency 16']['out_tok_s'] / rows['max-batch 1, concurrency 16']['out_tok_s']:.2f}x "
              "output tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=describe(), config=args.config, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
