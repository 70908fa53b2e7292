"""The `4b` shape itself at MedGemma 1.5's full input sizes, on a GPU: time to first token, decode speed at
that context, and peak memory, for 85 CT/MR slices (~22k tokens) and 126 pathology patches (~33k tokens).

    python benchmarks/volumes_gpu.py                       # cuda, bf16, random weights of the true 4b shapes
    python benchmarks/volumes_gpu.py --config nano --device cpu --images 3   # a quick check of the script

Weights are random (no checkpoint can be had here); the shapes, token counts and code path are the real
ones: `engine.generate_ids` runs the vision tower in batches of `VISION_BATCH` images and the prefill in
2048-token chunks, exactly as `ask` on a series folder or a slide case does after tokenisation. Pixels are
random 896 px images (the tower's cost does not depend on content). Peak memory is `max_memory_allocated`
over the run minus the resident weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402

from openmedgemma.config import get_config  # noqa: E402
from openmedgemma.engine import GenerationConfig, KVCache, generate_ids  # noqa: E402
from openmedgemma.model.medgemma import MedGemma  # noqa: E402


def prompt_ids(cfg, n_images: int, gen: torch.Generator) -> list[int]:
    """bos, an instruction, n x (boi, soft tokens, eoi, a 3-token label), a question, the turn markers."""
    vocab = cfg.text.vocab_size

    def text(n):
        return torch.randint(10, min(vocab, 200_000), (n,), generator=gen).tolist()

    ids = [2] + text(24)
    for _ in range(n_images):
        ids += [cfg.boi_token_index] + [cfg.image_token_index] * cfg.mm_tokens_per_image + [cfg.eoi_token_index]
        ids += text(3)
    return ids + text(20)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_case(model, cfg, n_images: int, new: int, device) -> dict:
    gen = torch.Generator().manual_seed(n_images)
    ids = prompt_ids(cfg, n_images, gen)
    size = cfg.vision.image_size
    pixels = (torch.rand(n_images, 3, size, size, generator=gen) * 2 - 1).to(model.dtype)
    out = {}
    for n in (1, new):
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if str(device).startswith("cuda") else 0
        sync(device)
        t = time.perf_counter()
        tokens = generate_ids(model, [ids], [pixels], GenerationConfig(max_new_tokens=n))
        sync(device)
        out[n] = time.perf_counter() - t
        if n == new and str(device).startswith("cuda"):
            out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        assert len(tokens[0]) == n
    kv = KVCache.nbytes_for(cfg.text, 1, len(ids) + new, model.dtype)
    return dict(images=n_images, prompt_tokens=len(ids), ttft_s=out[1], decode_tok_s=(new - 1) / (out[new] - out[1]),
                peak_gib=out.get("peak_bytes", 0) / 2**30, kv_gib=kv / 2**30)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--images", default="85,126", help="image counts (85 slices, 126 patches)")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = get_config(args.config)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = MedGemma(cfg).to(getattr(torch, args.dtype)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"machine: {describe()}; {datetime.date.today()}\n{args.config}: {weights / 2**30:.2f} GiB of {args.dtype} "
          f"weights on {args.device}", flush=True)  # fmt: skip
    rows = []
    for n in (int(x) for x in args.images.split(",")):
        run_case(model, cfg, n, 2, args.device)  # warm-up at this size: kernels for its shapes, the allocator
        row = run_case(model, cfg, n, args.new, args.device)
        rows.append(row)
        print(f"{n:>4} images: {row['prompt_tokens']:>6} prompt tokens; time to first token {row['ttft_s']:.2f} s; "
              f"decode {row['decode_tok_s']:.1f} tok/s at that context; peak {row['peak_gib']:.2f} GiB over the "
              f"weights (KV cache {row['kv_gib']:.2f} GiB)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(dict(machine=describe(), config=args.config, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
