"""Training throughput: ours vs transformers on the same model, weights, data and loop.

CPU (default): a small multimodal Gemma 3 (see `cpu_config`) is created by transformers with random weights and
saved; our MedGemma loads the same files. Both train with the same AdamW loop on the same pre-collated VQA-RAD
SFT batches (chat template, image soft tokens, labels on the answers only): transformers through
`Gemma3ForConditionalGeneration(..., labels=...)`, ours through `openmedgemma.train` (`LMModule`, which projects
only the labelled positions onto the vocabulary). The first-step losses are checked to agree. Steps alternate
between the two models in rounds and the medians are compared; tokens/s counts non-padding tokens.

GPU (`--device cuda`): one LoRA training step (r 16, all linear layers, bf16 weights, bf16 autocast) of the
MedGemma `4b` shape with random weights, batch x length tokens with one 896 px image each, and its MFU:
model FLOPs = 2 x params x tokens forward + 2 x params x tokens for the input gradients (LoRA: the frozen
weights need no weight gradients) + the attention score FLOPs, over the device's dense bf16 peak.

    python benchmarks/train.py                         # CPU, ours vs transformers
    python benchmarks/train.py --device cuda --steps 5 # GPU, 4b LoRA step + MFU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DEFAULT_DATA = ROOT.parent / "shared" / "data"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, SXM parts


def cpu_config(tok) -> dict:
    text = dict(
        model_type="gemma3_text", vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        sliding_window=128, rope_scaling={"rope_type": "linear", "factor": 8.0}, pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
    )  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=3, image_size=224, patch_size=14, vision_use_head=False)  # fmt: skip
    return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text,
                vision_config=vision, mm_tokens_per_image=64, boi_token_index=tok.boi_id, eoi_token_index=tok.eoi_id,
                image_token_index=tok.image_token_id)  # fmt: skip


def build(folder: Path, data: Path, vocab: int):
    """Tokenizer (trained on VQA-RAD text, `vocab` ids) and a transformers checkpoint of cpu_config."""
    import torch
    import transformers

    from openmedgemma.tokenizer import Tokenizer, build_tokenizer
    from openmedgemma.train import data as D

    records = json.loads((data / "vqa_rad" / D.VQA_RAD_JSON).read_text())
    texts = [D.VQA_PROMPT] + [f"{r['question']} {r['answer']}" for r in records]
    tok_dir = build_tokenizer(folder / "tok", "compact", texts, vocab_size=vocab)
    tok = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(**cpu_config(tok)))
    hf.save_pretrained(folder / "hf")
    return tok, folder / "hf"


def batches(tok, data: Path, n: int, batch_size: int, image_size: int, image_tokens: int):
    from openmedgemma.train.collate import LMCollator
    from openmedgemma.train.data import vqa_rad

    examples = vqa_rad(data / "vqa_rad", "train", "balanced")[: n * batch_size]
    collate = LMCollator(tok, image_seq_length=image_tokens, image_size=image_size, max_length=512)
    return [collate(examples[i * batch_size : (i + 1) * batch_size]) for i in range(n)]


def cpu(args) -> None:
    import torch
    import transformers

    from openmedgemma import MedGemma
    from openmedgemma.train.modeling import LMModule

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok, folder = build(Path(tmp), args.data, args.vocab)
        hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).train()
        ours = LMModule(MedGemma.from_pretrained(folder, dtype=torch.float32)).train()
    cfg = ours.model.config
    data = batches(tok, args.data, args.batches, args.batch_size, cfg.vision.image_size, cfg.mm_tokens_per_image)

    def step_ours(model, opt, b):
        loss, count, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / count

    def step_full_logits(model, opt, b):  # ours, but the vocabulary projection at every position (as transformers)
        logits = model.model(b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step_hf(model, opt, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    token_type_ids=(b["input_ids"] == cfg.image_token_index).long(), labels=b["labels"])  # fmt: skip
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    with tempfile.TemporaryDirectory() as tmp:  # a third copy of the same weights for the full-logits variant
        ours.model.save_pretrained(tmp)
        full = LMModule(MedGemma.from_pretrained(tmp, dtype=torch.float32)).train()
    runs = {"ours": (ours, step_ours), "transformers": (hf, step_hf), "ours_full_logits": (full, step_full_logits)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, (m, _) in runs.items()}
    first = {k: fn(m, opts[k], data[0]) for k, (m, fn) in runs.items()}  # also warms up
    for k in ("ours", "ours_full_logits"):
        assert abs(first[k] - first["transformers"]) < 1e-4 * abs(first["transformers"]), f"losses differ: {first}"
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens = []
    for i in range(1, args.steps + 1):
        b = data[i % len(data)]
        tokens.append(b["n_tokens"])
        for k, (m, fn) in (list(runs.items()) if i % 2 else list(runs.items())[::-1]):
            t0 = time.perf_counter()
            fn(m, opts[k], b)
            times[k].append(time.perf_counter() - t0)
    tps = {k: statistics.median(n / t for n, t in zip(tokens, ts)) for k, ts in times.items()}
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: {n_params / 1e6:.1f}M params (vocab {cfg.text.vocab_size}, {cfg.text.num_hidden_layers} layers, "
          f"hidden {cfg.text.hidden_size}; vision {cfg.vision.num_hidden_layers} layers at {cfg.vision.image_size} px, "
          f"{cfg.mm_tokens_per_image} soft tokens)")  # fmt: skip
    print(f"data: VQA-RAD balanced train, batch {args.batch_size}, median {statistics.median(tokens):.0f} tokens/step; "
          f"first-step loss ours {first['ours']:.6f}, transformers {first['transformers']:.6f}")  # fmt: skip
    ms = {k: 1000 * statistics.median(ts) for k, ts in times.items()}
    print(f"{'':34}{'train tokens/s':>16}{'step (ms)':>12}{'vs transformers':>17}")
    for k, label in (("transformers", "transformers"), ("ours", "ours"),
                     ("ours_full_logits", "ours, logits at every position")):  # fmt: skip
        print(f"{label:34}{tps[k]:>16.0f}{ms[k]:>12.1f}{tps[k] / tps['transformers']:>17.2f}")
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.steps} steps each")  # fmt: skip


def gpu(args) -> None:
    import torch

    from openmedgemma import MedGemma
    from openmedgemma.config import get_config
    from openmedgemma.train.lora import apply_lora
    from openmedgemma.train.modeling import LMModule, init_weights

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device)
    sync = torch.cuda.synchronize
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    cfg = get_config(args.shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = MedGemma(cfg)
    init_weights(model, 0.02)
    model = model.to(torch.bfloat16)
    model.language_model.gradient_checkpointing = args.checkpointing
    model.vision_tower.vision_model.encoder.gradient_checkpointing = args.checkpointing
    peft_model = apply_lora(model, r=16, alpha=16, dropout=0.05)
    module = LMModule(model).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    b, t, image = args.batch_size, args.seq_len, cfg.mm_tokens_per_image
    ids = torch.randint(10, min(200_000, cfg.text.vocab_size), (b, t), device=device)
    ids[:, 1] = cfg.boi_token_index
    ids[:, 2 : 2 + image] = cfg.image_token_index
    ids[:, 2 + image] = cfg.eoi_token_index
    labels = ids.clone()
    labels[:, : t // 2] = -100  # loss on the second half (the "answer")
    pixels = torch.rand(b, 3, cfg.vision.image_size, cfg.vision.image_size, device=device) * 2 - 1
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, count, _ = module(ids, mask, labels, pixels)
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tc, vc = cfg.text, cfg.vision
    text_params = sum(p.numel() for p in model.language_model.parameters())
    vision_params = n_params - text_params
    patches = vc.num_patches
    flops = 4 * text_params * b * t + 4 * vision_params * b * patches  # forward + input gradients (LoRA)
    flops += 3 * 2 * 2 * b * t * t * tc.num_attention_heads * tc.head_dim * tc.num_hidden_layers  # QK^T and AV, fwd + bwd
    flops += 3 * 2 * 2 * b * patches * patches * vc.hidden_size * vc.num_hidden_layers
    achieved = flops / dt / 1e12
    print(f"device: {name}; shape {args.shape}: {n_params / 1e9:.2f}B params, LoRA {n_lora / 1e6:.1f}M trainable")
    print(f"one LoRA step, batch {b} x {t} tokens (one {vc.image_size} px image each), bf16: {1000 * dt:.0f} ms, "
          f"{b * t / dt:.0f} tokens/s, {achieved:.0f} TFLOP/s"
          + (f", MFU {100 * achieved / peak:.1f}% of {peak:.0f}" if peak else " (pass --peak-tflops for MFU)"))
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; gradient checkpointing {args.checkpointing}")
    del peft_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 2 with --device cuda")
    ap.add_argument("--batches", type=int, default=8, help="distinct batches cycled through (CPU)")
    ap.add_argument("--vocab", type=int, default=32_000, help="vocabulary of the CPU model")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared machine more threads mostly wait)")
    ap.add_argument("--shape", default="4b", help="registry config for the GPU step")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    args = ap.parse_args()
    if args.batch_size is None:
        args.batch_size = 2 if args.device == "cuda" else 4
    if args.device == "cuda":
        return gpu(args)
    return cpu(args)


if __name__ == "__main__":
    main()
