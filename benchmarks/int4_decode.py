"""End-to-end decode with int4 vs fp32 vs int8 weights, one run: the random `130m` shape of benchmarks/generate.py.

    python benchmarks/int4_decode.py [--threads 1,2] [--prompt 128] [--new 128] [--repeats 3]

Same random weights and prompt for all; transformers fp32 as the common reference (ratios comparable with
the llama.cpp table of issue 17). Also prints the greedy agreement of int4 and int8 with fp32 over the new
tokens (lossy formats: not expected to be equal), and the int4 bytes of the `4b` text weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from generate import _ours_runner, build, measure, ours_setup, text_config  # noqa: E402
from machine import describe  # noqa: E402

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.engine import GenerationConfig, generate_ids  # noqa: E402
from openmedgemma.engine.int4 import GROUP, Int4Linear  # noqa: E402


def int4_bytes_4b() -> dict:
    """Bytes of the `4b` text weights: decoder linears and the tied head in int4 (0.5 B + 2 B per 32 weights)."""
    cfg = text_config("4b")
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    linears = ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd * h + cfg.num_attention_heads * hd * h
               + 3 * h * i) * cfg.num_hidden_layers  # fmt: skip
    head = cfg.vocab_size * h
    per = 0.5 + 2 / GROUP
    return dict(linears_int4=linears * per, head_int4=head * per, embedding_bf16=head * 2, linears_bf16=linears * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="130m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe())
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory() as folder:
        hf, cfg = build(args.shape, torch.float32, "cpu", Path(folder))
        variants = {}
        for impl in ("ours", "ours-int8", "ours-int4"):
            model = MedGemma.from_pretrained(folder)
            variants[impl] = (model, *ours_setup(model, impl))
        kernel = next(m.kernel for m in variants["ours-int4"][0].modules() if isinstance(m, Int4Linear))
        print(f"int4 layers: {kernel}")
        prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        prompts = prompt.tolist()

        def hf_run(n):
            with torch.inference_mode():
                hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=n, pad_token_id=0)  # fmt: skip

        runners = {label: _ours_runner(m, prompts, head, fast) for label, (m, head, fast) in variants.items()}
        runners["transformers"] = hf_run
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            res = measure(runners, args.prompt, args.new, 1, args.repeats, "cpu")
            ref = res["transformers"]
            print(f"-- {args.shape}, {threads} thread(s), prompt {args.prompt}, {args.new} new tokens, greedy")
            print(f"{'impl':<14}{'decode tok/s':>14}{'x tf':>7}{'x fp32':>8}{'prefill tok/s':>15}{'x tf':>7}")
            for label, r in res.items():
                print(f"{label:<14}{r['decode_tok_s']:>14.1f}{r['decode_tok_s'] / ref['decode_tok_s']:>7.2f}"
                      f"{r['decode_tok_s'] / res['ours']['decode_tok_s']:>8.2f}{r['prefill_tok_s']:>15.1f}"
                      f"{r['prefill_tok_s'] / ref['prefill_tok_s']:>7.2f}")  # fmt: skip
        fp32 = generate_ids(variants["ours"][0], prompts, None, GenerationConfig(max_new_tokens=args.new))[0]
        for impl in ("ours-int8", "ours-int4"):
            model, head, _ = variants[impl]
            out = generate_ids(model, prompts, None, GenerationConfig(max_new_tokens=args.new))[0]
            first = next((i for i, (a, b) in enumerate(zip(fp32, out)) if a != b), len(out))
            same = sum(a == b for a, b in zip(fp32, out))
            print(f"{impl} vs fp32 greedy (model's own head): first {first} of {len(out)} tokens agree, {same} equal")
    sizes = int4_bytes_4b()
    print("4b text weights: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
