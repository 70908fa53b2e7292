"""Every decoder weight format of `engine.quant.MODES` against fp32: logit error, greedy agreement, bytes, decode speed.

    python benchmarks/formats.py [--models nano,130m] [--threads 1] [--prompt 128] [--new 128] [--repeats 2]

Models: the bundled nano model (models/medgemma-nano) and random weights of a Gemma 3 shape of
benchmarks/generate.py (`130m`, initialised by transformers as its `build` does). For each format (fp32, then
each mode, int4 included where the engine has it): on one random 128-token prompt, the last position's logits
against fp32 (max abs error, and relative L2 error), the greedy tokens of 128 new tokens against fp32's
(share of equal positions, and the first difference), the bytes of the decoder layers' weights (the tied
head / embedding not included: it is the same table for every format, plus a copy for the quantized head),
and decode (and prefill) tokens/s through the engine's `TokenStream` (what `Engine` runs: fast decoder, quantized head),
best of --repeats (formats timed in turn), with the ratio to fp32 measured in the same run. Last row: the whole model in bf16
(`from_pretrained(..., dtype=torch.bfloat16)`: activations, cache and head in bf16 too). Prints the CPU (engine/cpu.py) and each
format's kernel choice.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from generate import build  # noqa: E402  (benchmarks/generate.py, next to this file)

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.bundled import nano_path  # noqa: E402
from openmedgemma.engine import GenerationConfig, TokenStream, cpu, quantize  # noqa: E402
from openmedgemma.engine.engine import kernel_notice  # noqa: E402
from openmedgemma.engine.quant import MODES, quantized_head  # noqa: E402


WHOLE_BF16 = "model in bf16"


def load(name: str, folder: Path):
    if name == "nano":
        return MedGemma.from_pretrained(nano_path("medgemma"))
    build(name, torch.float32, "cpu", folder)  # transformers' own random init, saved as a checkpoint
    return MedGemma.from_pretrained(folder)


REPORT = ("FINDINGS: The cardiac silhouette is normal in size. There is a small left pleural effusion with adjacent "
          "basilar atelectasis. No pneumothorax. The right lung is clear. Degenerative changes of the thoracic spine. "
          "IMPRESSION: Small left pleural effusion. Please write the report again, in plain words for the patient: ")


def prompt_ids(name: str, model, length: int) -> list[int]:
    """nano: a radiology report and a request, so the answer is text; random shapes: random ids (no tokenizer)."""
    if name == "nano":
        from openmedgemma.tokenizer import Tokenizer

        ids = Tokenizer.from_pretrained(nano_path("medgemma")).encode(REPORT * 4)
        return [2] + ids[-(length - 1) :]  # bos, then the prompt's end (the request)
    cfg = model.config
    special = {cfg.image_token_index, getattr(cfg, "boi_token_index", -1), getattr(cfg, "eoi_token_index", -1)}
    gen = torch.Generator().manual_seed(0)
    ids = [t for t in torch.randint(3, min(cfg.text.vocab_size, 4000), (2 * length,), generator=gen).tolist()
           if t not in special]  # fmt: skip
    return [2] + ids[: length - 1]


def decoder_bytes(model) -> int:
    layers = model.language_model.layers
    return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def prepare(model, mode: str | None, ids: list[int]) -> dict:
    """A copy of `model` in this format, its quantized head, last-position logits, bytes and kernel choice."""
    model = copy.deepcopy(model)
    head = None
    if mode == WHOLE_BF16:  # the whole model in bf16 (activations too), as `--dtype bfloat16` loads it
        model = model.to(torch.bfloat16)
    elif mode:
        quantize(model, mode)
        head = quantized_head(model, mode)
    with torch.no_grad():
        logits = (head or model.logits)(model.hidden_states(torch.tensor([ids]))[:, -1])[0].float()
    kernel = "torch's bf16 ops (oneDNN)" if mode == WHOLE_BF16 else "BLAS (MKL)"
    if mode and mode != WHOLE_BF16:
        kernel = kernel_notice(model, mode, head).split(": ", 1)[1].split("; CPU ")[0]
    return dict(model=model, head=head, logits=logits, bytes=decoder_bytes(model), kernel=kernel, tok_s=0.0)


def decode(entry: dict, ids: list[int], new: int) -> None:
    """One greedy generation through TokenStream: keeps its tokens and the best decode tokens/s so far."""
    stream = TokenStream(entry["model"], [ids], [None], GenerationConfig(max_new_tokens=new), head=entry["head"],
                         fast=True)  # fmt: skip
    entry["tokens"] = [t[0] for t in stream]
    entry["tok_s"] = max(entry["tok_s"], (new - 1) / stream.decode_seconds)
    entry["prefill_tok_s"] = max(entry.get("prefill_tok_s", 0.0), len(ids) / stream.prefill_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="nano,130m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
          f"{args.threads} thread(s); load average {Path('/proc/loadavg').read_text().split()[:3]}")  # fmt: skip
    print(f"CPU {cpu.detect().describe()}")
    modes = [None, *args.modes.split(","), WHOLE_BF16]
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            model = load(name, Path(folder))
            ids = prompt_ids(name, model, args.prompt)
            results = {mode: prepare(model, mode, ids) for mode in modes}
        for _ in range(args.repeats):  # formats in turn, so a burst of load elsewhere does not hit one alone
            for entry in results.values():
                decode(entry, ids, args.new)
        ref = results[None]
        params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
        print(f"\n-- {name} ({params:.1f}M params), prompt {args.prompt}, {args.new} new tokens, greedy")
        print(f"{'format':<14}{'max abs err':>12}{'rel L2 err':>11}{'greedy same':>13}{'first diff':>11}"
              f"{'decoder MB':>11}{'x fp32':>7}{'decode tok/s':>13}{'x fp32':>7}{'prefill tok/s':>14}{'x fp32':>7}")  # fmt: skip
        for mode, r in results.items():
            err = (r["logits"] - ref["logits"]).abs().max().item()
            rel = ((r["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
            same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
            first = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b), args.new)
            print(f"{mode or 'fp32':<14}{err:>12.2e}{rel:>11.2e}{f'{same}/{args.new}':>13}{first:>11}"
                  f"{r['bytes'] / 1e6:>11.1f}{r['bytes'] / ref['bytes']:>7.2f}{r['tok_s']:>13.1f}"
                  f"{r['tok_s'] / ref['tok_s']:>7.2f}{r['prefill_tok_s']:>14.0f}"
                  f"{r['prefill_tok_s'] / ref['prefill_tok_s']:>7.2f}")  # fmt: skip
        print("kernels: " + "; ".join(f"{mode}: {r['kernel']}" for mode, r in results.items() if mode))
        distinct = len(set(ref["tokens"]))
        print(f"fp32 greedy continuation: {distinct} distinct tokens of {args.new}")
    print(f"load average at the end {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
