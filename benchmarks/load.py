"""Checkpoint loading: time and peak memory, ours vs transformers' from_pretrained, same run.

A multimodal Gemma 3 checkpoint of a few hundred MB (bf16, sharded) is written once by
transformers; each load then runs in a fresh process (peak RSS is per process), alternating
ours and transformers, and the medians are compared. Ours maps the files lazily, so the
"load" time alone flatters it: "load+touch" also reads every weight once, which is the fair
figure for a model about to run, and peak RSS is taken after that.

    python benchmarks/load.py [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config() -> dict:
    text = dict(
        model_type="gemma3_text", vocab_size=32_000, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
        query_pre_attn_scalar=128, sliding_window=512, rope_scaling={"rope_type": "linear", "factor": 8.0},
    )  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=6, image_size=224, patch_size=14, vision_use_head=False)  # fmt: skip
    return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text,
                vision_config=vision, mm_tokens_per_image=64, boi_token_index=31_000, eoi_token_index=31_001,
                image_token_index=31_002)  # fmt: skip


def write_checkpoint(folder: Path) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(**config())).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM). ru_maxrss is unusable here: a child inherits its parent's."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(which: str, folder: str, dtype: str) -> None:
    import torch

    if which == "ours":
        from openmedgemma import MedGemma
    else:
        import transformers
    base = peak_rss_mb(reset=True)
    t0 = time.perf_counter()
    if which == "ours":
        model = MedGemma.from_pretrained(folder, dtype=dtype)
    else:
        model = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
    t1 = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in model.parameters())  # read every weight once
    t2 = time.perf_counter()
    print(json.dumps(dict(load_s=t1 - t0, touch_s=t2 - t0, peak_mb=peak_rss_mb() - base, checksum=total)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--worker", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        size = write_checkpoint(folder)
        print(f"checkpoint: {size / 1e6:.0f} MB bf16 in {len(list(folder.glob('*.safetensors')))} shards; load as {args.dtype}")
        runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            for which in runs:
                out = subprocess.run(
                    [sys.executable, __file__, "--dtype", args.dtype, "--worker", which, str(folder)],
                    check=True, capture_output=True, text=True, cwd=ROOT,
                ).stdout  # fmt: skip
                runs[which].append(json.loads(out.strip().splitlines()[-1]))
        sums = {w: {r["checksum"] for r in rs} for w, rs in runs.items()}
        assert sums["ours"] == sums["transformers"], f"the two loaders read different weights: {sums}"
        med = {w: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "touch_s", "peak_mb")} for w, rs in runs.items()}
        print(f"{'':14}{'ours':>10}{'transformers':>14}{'ours/transformers':>20}")
        for key, label in (("load_s", "load (s)"), ("touch_s", "load+touch (s)"), ("peak_mb", "peak RSS (MB)")):
            o, t = med["ours"][key], med["transformers"][key]
            print(f"{label:14}{o:>10.3f}{t:>14.3f}{o / t:>20.2f}")
        ratio = {w: med[w]["peak_mb"] * 2**20 / size for w in med}
        print(f"peak RSS / checkpoint size: ours {ratio['ours']:.2f}, transformers {ratio['transformers']:.2f} "
              "(touching reads each weight as fp32 once: +1 fp32 copy of the largest tensor)")
        print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
