"""`benchmarks/generate.py --peer llama.cpp`: ours, transformers and llama.cpp at each weight format, one run.

    python benchmarks/generate.py --peer llama.cpp                      # 130m shape, 1 and 2 threads
    python benchmarks/generate.py --peer llama.cpp --configs 4b         # the real 4b text shapes, bf16 source
    python benchmarks/generate.py --peer llama.cpp --formats int8 --peer-formats q8_0 --thread-list 1

130m (and 10m): transformers builds random fp32 weights and saves them (as `generate.py` does); llama.cpp's
convert_hf_to_gguf.py turns that folder into f32 and f16 GGUF, llama_model_quantize makes q8_0 and q4_0 from
the f32 one; ours loads the folder in fp32 and runs plain and after `quantize(model, mode)` for every mode in
`openmedgemma.engine.quant.MODES` (modes asked for but not there yet are skipped with a note). Every
implementation gets the same prompt of random ids, greedy, no stop tokens; timed with `measure()` (1 and N new
tokens, alternating implementations, medians). Conversion is checked: last-prompt-position logits and greedy
tokens of each format against transformers fp32.

4b: the true 4b text shapes (3.88B params) cannot be built in fp32 here, so random bf16 weights are written
tensor by tensor in the text-only checkpoint layout (plus llama.cpp GGUF bf16 -> q8_0 / q4_0). Each
implementation then runs in its own fresh process (one model in memory at a time): decode tok/s and TTFT timed
token by token within each generation, and the peak RSS of the whole process, weights included (by default
a 64-token prompt, 32 new tokens, 1 repeat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import generate as G
import llama_cpp_peer as P
import machine

PEER_FORMATS = ("f32", "f16", "q8_0", "q4_0")


def our_modes(asked: list[str] | None) -> list[str]:
    """The modes to run: those asked for (default: all of MODES) that exist; a note for each missing one.
    ("fp32" as a mode is the fp32 weights in the decode kernel's blocks; the plain fp32 model always runs.)"""
    from openmedgemma.engine.quant import MODES

    modes = [m for m in (asked or MODES) if m != "bf16-as-loaded"]
    for m in modes:
        if m not in MODES:
            print(f"note: ours {m!r} is not in openmedgemma.engine.quant.MODES {MODES} in this checkout: skipped")
    return [m for m in modes if m in MODES]


def decode_bits_per_weight(model, head, n_params: int) -> float:
    """Bits per weight of what one decode step reads: the decoder's tensors and the output head (the embedding
    table when the head is tied to it; a separate quantized head replaces it, the table then serving one row
    per token), over the decoder's parameter count (a tied table counted once). A tensor seen twice (same
    address and size) is counted once."""
    lm = model.language_model
    tensors = [t for k, t in lm.state_dict().items() if head is None or not k.startswith("embed_tokens.")]
    tensors += list(head.state_dict().values()) if head is not None else []
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return 8 * total / n_params


def agreement(mine: list[int], reference: list[int]) -> int:
    """Number of leading greedy tokens identical to the reference's."""
    return next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), min(len(mine), len(reference)))


# ------------------------------------------------------------------ 130m / 10m: one process, every implementation


def bench_small(name: str, args, folder: Path) -> dict:
    from openmedgemma import MedGemma
    from openmedgemma.engine import GenerationConfig
    from openmedgemma.engine.generate import TokenStream

    llama_cpp, build_info = P.load()
    hf, cfg = G.build(name, torch.float32, "cpu", folder)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"\n== {name}: {n_params / 1e6:.1f}M params; llama.cpp: {build_info}", flush=True)

    ggufs, f32, t = {}, None, time.perf_counter()
    log = folder / "convert.log"
    for fmt in args.peer_formats:
        if fmt == "f16":
            ggufs[fmt] = P.convert(folder, folder, fmt, log)
        else:  # q8_0 / q4_0 are quantized from the f32 file (the lossless source)
            f32 = f32 or P.convert(folder, folder, "f32", log)
            ggufs[fmt] = f32 if fmt == "f32" else P.quantize(llama_cpp, f32, fmt, max(args.thread_list), log)
    print(f"GGUF {', '.join(ggufs)} written in {time.perf_counter() - t:.1f} s (converter / quantize log: {log})")

    ours = {"ours fp32": (MedGemma.from_pretrained(folder, dtype=torch.float32), None, True)}  # model, head, fast
    for mode in our_modes(args.formats):
        model = MedGemma.from_pretrained(folder, dtype=torch.float32)
        head, _ = G.ours_setup(model, f"ours-{mode}")
        ours["ours fp32 blocks" if mode == "fp32" else f"ours {mode}"] = (model, head, True)
    if args.compile:  # each also with its decode step compiled (Engine(compile=True)): the same model objects
        from openmedgemma.engine.fast import DecoderRunner

        for label, (model, head, _) in list(ours.items()):
            ours[f"{label} compiled"] = (model, head, DecoderRunner(model.language_model, compile=True))
    bits = {"transformers fp32": 32.0}
    for label, (model, head, _) in ours.items():
        bits[label] = decode_bits_per_weight(model, head, n_params)

    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = prompt[0].tolist()

    def hf_run(n, **kw):
        with torch.inference_mode():
            return hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, pad_token_id=0, **kw)  # fmt: skip

    def ours_run(model, head, fast):
        def run(n):
            out = []
            for step in TokenStream(model, [ids], [None], GenerationConfig(max_new_tokens=n), head=head, fast=fast):
                out.append(step[0])
            return out

        return run

    for label, (model, head, fast) in ours.items():
        if fast is not True:  # compiled outside the timing: the first step builds it, larger capacities reuse it;
            t = time.perf_counter()  # ahead of time, one artifact per thread count: each built here
            for threads in args.thread_list:
                torch.set_num_threads(threads)
                for n in (2, 3, args.new):
                    ours_run(model, head, fast)(n)
            print(f"{label}: compiled ({fast.compiled_by or 'no: runs eagerly'}, threads {args.thread_list}) in {fast.compile_seconds:.1f} s "
                  f"({time.perf_counter() - t:.1f} s with warm-up)")  # fmt: skip

    # numerics: greedy tokens and the last prompt position's logits against transformers fp32
    torch.set_num_threads(1)
    reference = hf_run(args.new)[0, args.prompt :].tolist()
    with torch.inference_mode():
        ref_logits = hf(prompt).logits[0, -1].float().numpy()
    checks = {}
    for label, (model, head, fast) in ours.items():
        checks[label] = dict(same_tokens=agreement(ours_run(model, head, fast)(args.new), reference))
    for fmt, path in ggufs.items():
        peer = P.Peer(llama_cpp, path, 1)
        bits[f"llama.cpp {fmt}"] = peer.bits_per_weight
        diff = np.abs(peer.prompt_logits(ids) - ref_logits).max()
        checks[f"llama.cpp {fmt}"] = dict(same_tokens=agreement(peer.generate(ids, args.new), reference),
                                          max_abs_logit_diff=float(diff))  # fmt: skip
        peer.close()
    print(f"greedy tokens identical to transformers fp32 (of {args.new}), and max |logit difference| at the last "
          f"prompt position (transformers fp32 logits span {ref_logits.min():.2f}..{ref_logits.max():.2f}):")  # fmt: skip
    for label, c in checks.items():
        extra = f"; max |logit diff| {c['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in c else ""
        print(f"  {label:<22}{c['same_tokens']:>4}{extra}")

    report = dict(config=name, params=n_params, llama_cpp=build_info, bits_per_weight=bits, checks=checks, runs={})
    for threads in args.thread_list:
        torch.set_num_threads(threads)
        peers = {f"llama.cpp {fmt}": P.Peer(llama_cpp, path, threads) for fmt, path in ggufs.items()}
        runners = {"transformers fp32": hf_run}
        runners.update({label: ours_run(model, head, fast) for label, (model, head, fast) in ours.items()})
        runners.update({label: (lambda n, p=p: p.generate(ids, n)) for label, p in peers.items()})
        results = G.measure(runners, args.prompt, args.new, 1, args.repeats, "cpu")
        for p in peers.values():
            p.close()
        report["runs"][f"threads={threads}"] = results
        print_table(f"{name}, {threads} thread{'s' if threads > 1 else ''}, load {load_average()}", results, bits,
                    "transformers fp32")  # fmt: skip
    return report


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_table(title: str, results: dict, bits: dict, reference: str | None) -> None:
    ref = results.get(reference) if reference else None
    rss = "peak_rss" in next(iter(results.values()), {})
    print(f"\n| {title} | bits/weight | decode tok/s | prefill tok/s | TTFT ms |" + (" RSS GB peak / end |" if rss else ""))
    print("|---|---|---|---|---|" + ("---|" if rss else ""))
    for label, r in results.items():
        def cell(key, fmt, scale=1.0, r=r):
            text = format(r[key] * scale, fmt)
            return f"{text} ({r[key] / ref[key]:.2f}x)" if ref and label != reference else text

        row = (f"| {label} | {bits.get(label, float('nan')):.2f} | {cell('decode_tok_s', '.1f')} | "
               f"{cell('prefill_tok_s', '.0f')} | {cell('ttft_s', '.0f', 1e3)} |")  # fmt: skip
        if "peak_rss" in r:
            row += f" {r['peak_rss'] / 1e9:.2f} / {r['end_rss'] / 1e9:.2f} |"
        print(row, flush=True)


# ------------------------------------------------------------------ 4b: random bf16 checkpoint, one process each


def write_random_checkpoint(cfg, folder: Path, shard_bytes: int = 1 << 30) -> None:
    """Random bf16 weights of `cfg` in the text-only checkpoint layout (what ours' save_pretrained writes for a
    text-only config, `model.*`), generated and written shard by shard so that at most one shard (~1 GB) is in
    memory: the 4b shape in fp32 (15.5 GB) would not fit beside everything else. Norm gains are zero (Gemma's
    1 + w), the rest N(0, 0.02) as transformers initialises them."""
    from safetensors.torch import save_file

    from openmedgemma import MedGemma
    from openmedgemma.checkpoint import write_config
    from openmedgemma.config import MedGemmaConfig, to_hf_config
    from openmedgemma.model.pretrained import params_on_meta

    if (folder / "config.json").exists():
        return
    config = MedGemmaConfig(text=cfg, vision=None)
    with params_on_meta():
        model = MedGemma(config)
    rename = MedGemma._internal_to_disk(config, "original")
    shapes = {rename(k): t.shape for k, t in model.state_dict().items() if rename(k) is not None}
    folder.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16)
            shard[name] = t.zero_() if name.endswith("norm.weight") else t.normal_(0, 0.02, generator=gen)
            weight_map[name] = fname
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(metadata=dict(total_size=total),
                                                                         weight_map=weight_map)))  # fmt: skip
    write_config(folder, to_hf_config(config, "bfloat16"))


def bench_4b(args, work: Path) -> dict:
    """Our modes and llama.cpp q8_0 / q4_0 on the 4b text shapes, each in a fresh process."""
    cfg = G.text_config("4b")
    llama_cpp, build_info = P.load()
    hf_folder = work / "hf-bf16"
    t = time.perf_counter()
    write_random_checkpoint(cfg, hf_folder)
    print(f"\n== 4b: random bf16 checkpoint in {hf_folder} ({time.perf_counter() - t:.0f} s); llama.cpp: {build_info}",
          flush=True)  # fmt: skip
    ggufs = {}
    quant = [f for f in args.peer_formats if f in ("q8_0", "q4_0")]
    if quant:
        source = work / "model-bf16.gguf"
        if not source.exists():
            t = time.perf_counter()
            P.convert(hf_folder, work, "bf16", work / "convert.log")
            print(f"GGUF bf16 written in {time.perf_counter() - t:.0f} s", flush=True)
        for fmt in quant:
            target = work / f"model-{fmt}.gguf"
            if not target.exists():
                t = time.perf_counter()
                P.quantize(llama_cpp, source, fmt, os.cpu_count() or 1, work / "convert.log")
                print(f"GGUF {fmt} written in {time.perf_counter() - t:.0f} s", flush=True)
            ggufs[fmt] = target
    skipped = [f for f in args.peer_formats if f not in ("q8_0", "q4_0")]
    if skipped:
        print(f"note: llama.cpp {', '.join(skipped)} not run at 4b (only q8_0 / q4_0: f32 would need 15.5 GB)")

    base = ["ours bf16-as-loaded"] if not args.formats or "bf16-as-loaded" in args.formats else []
    impls = base + [f"ours {m}" for m in our_modes(args.formats) if m != "fp32"]  # fp32: 15.5 GB
    if args.compile:  # each quantized mode also with its decode step compiled (in the child, before the timing)
        impls += [f"{impl} compiled" for impl in impls if impl != "ours bf16-as-loaded"]
    impls += [f"llama.cpp {fmt}" for fmt in ggufs]
    report = dict(config="4b", llama_cpp=build_info, runs={})
    for threads in args.thread_list:
        results, bits = {}, {}
        for impl in impls:
            path = ggufs[impl.split()[1]] if impl.startswith("llama.cpp") else hf_folder
            cmd = [sys.executable, __file__, "--child", impl, str(path), str(threads), str(args.prompt), str(args.new),
                   str(args.repeats_4b)]  # fmt: skip
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{impl}: failed ({proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                continue
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            bits[impl] = results[impl].pop("bits_per_weight")
            print(f"  {impl}: {time.perf_counter() - t:.0f} s in its process", flush=True)
        report["runs"][f"threads={threads}"] = dict(results=results, bits_per_weight=bits)
        print_table(f"4b, {threads} thread{'s' if threads > 1 else ''}, prompt {args.prompt}, {args.new} new, "
                    f"load {load_average()}", results, bits, None)  # fmt: skip
    return report


def _child(impl: str, path: str, threads: int, prompt_len: int, new: int, repeats: int) -> None:
    """One 4b implementation in this fresh process: a warm-up generation, then `repeats` N-token generations, each
    timed token by token (TTFT = the first token; decode = the N - 1 after it), medians; peak RSS of the process.
    Timing within one generation, not as the difference of a 1- and an N-token run: with one repeat, a stall
    in either run would corrupt that difference."""
    torch.set_num_threads(threads)
    ids = torch.randint(3, G.text_config("4b").vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    if impl.startswith("llama.cpp"):
        llama_cpp, _ = P.load()
        peer = P.Peer(llama_cpp, Path(path), threads)
        bits = peer.bits_per_weight

        def stream(n):
            return peer.stream(ids, n)
    else:
        from openmedgemma import MedGemma
        from openmedgemma.engine import GenerationConfig
        from openmedgemma.engine.generate import TokenStream

        model = MedGemma.from_pretrained(path, dtype=torch.bfloat16)
        n_params = sum(p.numel() for p in model.language_model.parameters())  # before quantize replaces them
        mode = impl.split()[1]
        head = None if mode == "bf16-as-loaded" else G.ours_setup(model, f"ours-{mode}")[0]
        bits = decode_bits_per_weight(model, head, n_params)

        fast = True
        if impl.endswith(" compiled"):  # ahead of time, cached on disk per shape, format and threads (~80 s once)
            from openmedgemma.engine.fast import DecoderRunner

            fast = DecoderRunner(model.language_model, compile=True)

        def stream(n):
            return TokenStream(model, [ids], [None], GenerationConfig(max_new_tokens=n), head=head, fast=fast)

    for _ in stream(2 if impl.startswith("llama.cpp") or not impl.endswith(" compiled") else new):  # warm-up:
        # kernels, lazy initialisation, every weight page read once, the compiled step built at the full length
        pass
    ttft, decode = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for i, _ in enumerate(stream(new)):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - t)
        decode.append((new - 1) / (end - first))
    t1 = float(np.median(ttft))
    # peak: the whole process, weights included (for ours' modes also the bf16 pages read while quantizing);
    # end: what stays resident for serving
    rss = dict(peak_rss=G._proc_status("VmHWM"), end_rss=G._proc_status("VmRSS"))
    print(json.dumps(dict(ttft_s=t1, prefill_tok_s=prompt_len / t1, decode_tok_s=float(np.median(decode)), **rss,
                          bits_per_weight=bits)))  # fmt: skip


# ------------------------------------------------------------------ entry


def main(args) -> None:
    import tempfile

    args.formats = args.formats.split(",") if args.formats else None
    args.peer_formats = args.peer_formats.split(",") if args.peer_formats else list(PEER_FORMATS)
    args.thread_list = [int(t) for t in args.thread_list.split(",")]
    unknown = set(args.peer_formats) - set(PEER_FORMATS)
    if unknown:
        raise SystemExit(f"--peer-formats: unknown {sorted(unknown)}; use {','.join(PEER_FORMATS)}")
    import datetime

    print(f"machine: {machine.describe()}; llama-cpp-python {P.VERSION} (benchmark only); "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load {load_average()}", flush=True)  # fmt: skip
    reports = []
    given = args.prompt, args.new
    args.repeats_4b = args.repeats if args.repeats_given else 1
    for name in (args.configs or "130m").split(","):
        # 4b: a short run by default: 64-token prompt, 32 new tokens, one repeat
        args.prompt, args.new = given[0] or (64 if name == "4b" else 128), given[1] or (32 if name == "4b" else 128)
        if name == "4b":
            if args.work_dir:
                reports.append(bench_4b(args, args.work_dir))
            else:
                with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                    reports.append(bench_4b(args, Path(tmp)))
        else:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                reports.append(bench_small(name, args, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine.describe(), configs=reports), indent=2, default=float))


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        impl, path, threads, prompt_len, new, repeats = sys.argv[2:8]
        _child(impl, path, int(threads), int(prompt_len), int(new), int(repeats))
