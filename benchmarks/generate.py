"""Generation speed: ours vs transformers on the same random weights, in one process.

    python benchmarks/generate.py                          # CPU: ~10M and ~130M params, fp32, batch 1
    python benchmarks/generate.py --device cuda            # GPU: 4b shape, bf16, batch 1 and 32
    python benchmarks/generate.py --peer llama.cpp         # CPU: + llama.cpp at f32/f16/q8_0/q4_0 (generate_peer.py)

A Gemma 3 text decoder of each shape is built by transformers (its random init), saved, and loaded by
ours from the files. Prompt: 128 random tokens; 128 new tokens; greedy; stopping off on both sides.
Each implementation is timed with 1 and with N new tokens (medians of --repeats runs, alternating
ours and transformers): time to first token = the 1-token run, prefill tokens/s = prompt tokens / TTFT,
decode tokens/s = (N - 1) * batch / (t_N - t_1). Peak memory is the rise over the level with the weights
resident during one N-token run (CUDA: max_memory_allocated in the same process; CPU: ru_maxrss of a
fresh child process per implementation, since RSS cannot be attributed inside one process). KV-cache
bytes: ours as allocated (prompt + N slots, sliding layers a window); transformers' cache object after
the run. On CUDA transformers runs with its static cache, and decode is compared with the memory-
bandwidth bound: weight bytes read per step / measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openmedgemma import MedGemma  # noqa: E402
from openmedgemma.config import GemmaTextConfig, MedGemmaConfig, get_config, to_hf_config  # noqa: E402
from openmedgemma.engine import GenerationConfig, KVCache, generate_ids, quantize  # noqa: E402

SHAPES = {
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64),
    "130m": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=3, head_dim=128, query_pre_attn_scalar=128),
}  # fmt: skip


def text_config(name: str) -> GemmaTextConfig:
    if name == "4b":
        return get_config("4b").text
    return GemmaTextConfig(**SHAPES[name], sliding_window=1024, rope_global_linear_factor=8.0)


def build(name: str, dtype: torch.dtype, device: str, folder: Path):
    import transformers

    cfg = text_config(name)
    hf_dict = to_hf_config(MedGemmaConfig(text=cfg, vision=None), str(dtype).replace("torch.", ""))
    torch.manual_seed(0)
    hf_config = transformers.Gemma3TextConfig(**{k: v for k, v in hf_dict.items() if k != "architectures"})
    with torch.device(device):
        hf = transformers.Gemma3ForCausalLM(hf_config).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # generate exactly N tokens
    hf.save_pretrained(folder)
    return hf, cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache object holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = (1 << 30) // 4 if device.startswith("cuda") else (1 << 28) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * 10 / (time.perf_counter() - t)


def measure(runners: dict, prompt_len: int, new: int, batch: int, repeats: int, device: str) -> dict:
    """runners: name -> fn(n_new). Returns per name: ttft, prefill / decode tok/s (and CUDA peak memory)."""
    times = {name: {1: [], new: []} for name in runners}
    for name, fn in runners.items():  # warm up (allocator, kernels, lazy init)
        fn(2)
    for _ in range(repeats):
        for name, fn in runners.items():
            for n in (1, new):
                sync(device)
                t = time.perf_counter()
                fn(n)
                sync(device)
                times[name][n].append(time.perf_counter() - t)
    out = {}
    for name, fn in runners.items():
        t1, tn = statistics.median(times[name][1]), statistics.median(times[name][new])
        out[name] = dict(ttft_s=t1, prefill_tok_s=prompt_len * batch / t1, decode_tok_s=(new - 1) * batch / (tn - t1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(new)
            torch.cuda.synchronize()
            out[name]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    return out


def peak_rss_child(impl: str, folder: Path, args) -> int:
    """CPU peak memory of one generation, measured in a fresh process (RSS cannot be attributed within one).

    The child loads the weights and reads every one of them (so they are resident), runs a tiny
    generation (one-time initialisation), returns freed heap to the system (malloc_trim) and resets the
    kernel's high-water mark (/proc/self/clear_refs), runs one N-token generation and reports VmHWM
    minus the RSS it started from. Ours allocates its whole KV cache (prompt + N) before the prefill.
    """
    cmd = [sys.executable, __file__, "--peak-child", impl, str(folder), "--prompt", str(args.prompt), "--new",
           str(args.new), "--batch", str(args.batch), "--dtype", args.dtype]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and keeps later
    # blocks on its heap, so RSS would show allocator history rather than live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def _proc_status(key: str) -> int:
    import re

    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_child(impl: str, folder: str, args) -> None:
    import ctypes

    dtype = getattr(torch, args.dtype)
    if impl == "transformers":
        import transformers

        model = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        vocab = model.config.vocab_size
    else:
        model = MedGemma.from_pretrained(folder, dtype=dtype)
        # ours-compiled: one compiled decoder for both calls below (compiling is not the generation's memory)
        head, fast = ours_setup(model, impl)
        vocab = model.config.text.vocab_size
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.float().sum()  # read every weight, so that it is resident before the baseline
    prompts = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))

    def generate(ids, n):
        if impl == "transformers":
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               pad_token_id=0)  # fmt: skip
        else:
            from openmedgemma.engine.generate import TokenStream

            for _ in TokenStream(model, ids.tolist(), [None] * len(ids), GenerationConfig(max_new_tokens=n), head=head,
                                 fast=fast):  # fmt: skip
                pass

    if impl == "ours-compiled":
        generate(prompts, 3)  # the full-size shapes, so the measured run does not recompile
    generate(prompts[:, :8], 2)  # one-time initialisation (kernels, lazy imports) is not the generation's memory
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status("VmRSS")
    generate(prompts, args.new)
    print(max(0, _proc_status("VmHWM") - base))


def bench_config(name: str, args, folder: Path) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    batch_sizes = [1, 32] if name == "4b" else [args.batch]
    hf, cfg = build(name, dtype, device, folder)
    ours = MedGemma.from_pretrained(folder, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"\n== {name}: {n_params / 1e6:.1f}M params, {args.dtype}, {device}", flush=True)
    report = dict(config=name, params=n_params, dtype=args.dtype, device=device, results={})
    gen = torch.Generator().manual_seed(0)
    static = {"cache_implementation": "static"} if device.startswith("cuda") else {}

    variants = {"ours": (ours, *ours_setup(ours, "ours"))}  # label -> (model, head, fast)
    if args.int8:  # the dynamic-activation mode is CPU only
        for mode in ("int8",) if device.startswith("cuda") else ("int8", "int8-dynamic"):
            q = MedGemma.from_pretrained(folder, dtype=dtype, device=device)
            variants[f"ours-{mode}"] = (q, *ours_setup(q, f"ours-{mode}"))

    for batch in batch_sizes:
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt), generator=gen)
        prompt_lists = prompts.tolist()
        ids_dev = prompts.to(device)

        def hf_run(n, ids=ids_dev, **kwargs):
            with torch.inference_mode():
                return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n, pad_token_id=0, **static, **kwargs)  # fmt: skip

        runners = {label: _ours_runner(model, prompt_lists, head, fast)
                   for label, (model, head, fast) in variants.items()}  # fmt: skip
        if args.compile:
            # compiled outside the timing (the first decode step builds the graph; the next capacities reuse
            # it with dynamic shapes): compile seconds reported apart; a fresh decoder per batch size
            runners["ours-compiled"] = _ours_runner(ours, prompt_lists, *ours_setup(ours, "ours-compiled"))
            decoder = runners["ours-compiled"].decoder
            t = time.perf_counter()
            for n in (2, 3, args.new):
                runners["ours-compiled"](n)
            print(f"ours-compiled: decode step compiled ({decoder.compiled_by}) in {decoder.compile_seconds:.1f} s; warm-up "
                  f"(3 generations, recompiles included) {time.perf_counter() - t:.1f} s", flush=True)
            report.setdefault("compile_seconds", {})[f"batch{batch}"] = decoder.compile_seconds
        runners["transformers"] = hf_run
        results = measure(runners, args.prompt, args.new, batch, args.repeats, device)

        # one more N-token transformers run: its KV-cache size, and (batch 1) its greedy tokens to compare with ours
        out = hf_run(args.new, return_dict_in_generate=True)
        kv_hf = cache_bytes(out.past_key_values)
        same = None
        if batch == 1:
            theirs = out.sequences[0, args.prompt :].tolist()
            mine = generate_ids(ours, prompt_lists[:1], None, GenerationConfig(max_new_tokens=args.new))[0]
            same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        kv_ours = KVCache.nbytes_for(cfg, batch, args.prompt + args.new, dtype)
        for label in results:
            results[label]["kv_bytes"] = kv_hf if label == "transformers" else kv_ours
            if not device.startswith("cuda"):
                results[label]["peak_bytes"] = peak_rss_child(label, folder, args)
        entry = dict(batch=batch, results=results, same_greedy_tokens=same)
        if device.startswith("cuda"):
            bw = copy_bandwidth(device)
            entry["copy_bandwidth_GBps"] = bw / 1e9
            entry["bandwidth_bound_tok_s"] = bw / weight_bytes * batch
        report["results"][f"batch{batch}"] = entry
        _print(name, batch, entry, args.new)
        del out
    return report


def ours_setup(model, impl: str):
    """TokenStream's (head, fast) for one of our variants: "ours-<mode>" quantizes `model` in place and takes
    its int8 head (None off CPU); "ours-compiled" gets a new compiled DecoderRunner."""
    from openmedgemma.engine.fast import DecoderRunner
    from openmedgemma.engine.quant import quantized_head

    if impl == "ours-compiled":
        return None, DecoderRunner(model.language_model, compile=True)
    if impl == "ours":
        return None, True
    mode = impl.removeprefix("ours-")
    quantize(model, mode)
    return quantized_head(model, mode), True


def _ours_runner(model, prompts, head, fast):
    from openmedgemma.engine.generate import TokenStream

    def run(n):
        stream = TokenStream(model, prompts, [None] * len(prompts), GenerationConfig(max_new_tokens=n), head=head,
                             fast=fast)  # fmt: skip
        for _ in stream:
            pass

    run.decoder = fast
    return run


def _print(name: str, batch: int, entry: dict, new: int) -> None:
    res = entry["results"]
    ref = res["transformers"]
    print(f"-- {name} batch {batch}")
    print(f"{'impl':<20}{'decode tok/s':>14}{'x tf':>7}{'prefill tok/s':>15}{'x tf':>7}{'TTFT ms':>10}{'x tf':>7}"
          f"{'peak MB':>10}{'x tf':>7}{'KV MB':>9}{'x tf':>7}")  # fmt: skip
    for label, r in res.items():
        def ratio(key, r=r):
            return r[key] / ref[key] if ref[key] else float("nan")

        print(f"{label:<20}{r['decode_tok_s']:>14.1f}{ratio('decode_tok_s'):>7.2f}{r['prefill_tok_s']:>15.1f}"
              f"{ratio('prefill_tok_s'):>7.2f}{r['ttft_s'] * 1e3:>10.1f}{ratio('ttft_s'):>7.2f}"
              f"{r['peak_bytes'] / 2**20:>10.1f}{ratio('peak_bytes'):>7.2f}{r['kv_bytes'] / 2**20:>9.2f}"
              f"{ratio('kv_bytes'):>7.2f}")  # fmt: skip
    if entry.get("same_greedy_tokens") is not None:
        print(f"greedy tokens identical to transformers for the first {entry['same_greedy_tokens']} of {new}")
    if "bandwidth_bound_tok_s" in entry:
        bound = entry["bandwidth_bound_tok_s"]
        print(f"copy bandwidth {entry['copy_bandwidth_GBps']:.0f} GB/s; bandwidth-bound decode {bound:.1f} tok/s; "
              f"ours at {res['ours']['decode_tok_s'] / bound:.0%} of it")  # fmt: skip


def kv_32k_report() -> dict:
    text = get_config("4b").text
    ours = KVCache.nbytes_for(text, 1, 32768, torch.bfloat16)
    everything_global = GemmaTextConfig(**{**text.__dict__, "sliding_window": 1 << 30})
    full = KVCache.nbytes_for(everything_global, 1, 32768, torch.bfloat16)
    print(f"\n4b shape, 32k context, bf16, batch 1: KV cache {ours / 2**30:.2f} GiB vs all-global "
          f"{full / 2**30:.2f} GiB = {ours / full:.1%} (goal <= 30%)")  # fmt: skip
    return dict(ours_bytes=ours, all_global_bytes=full, ratio=ours / full)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {torch.get_num_threads()} threads{gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=None, help="comma list of 10m, 130m, 4b (default: CPU 10m,130m; GPU 4b)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; --peer at 4b: 64)")
    parser.add_argument("--new", type=int, default=None, help="new tokens (default 128; --peer at 4b: 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, medians (default 3; --peer at 4b: 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 variants")
    parser.add_argument("--compile", action="store_true", help="also time ours with Engine(compile=True)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    peer = parser.add_argument_group("--peer llama.cpp (benchmarks/generate_peer.py)")
    peer.add_argument("--peer", choices=["llama.cpp"], default=None,
                      help="also run llama.cpp (llama-cpp-python, built once from source into a cache) at each format")
    peer.add_argument("--formats", default=None, help="our modes, comma list (default: every mode in quant.MODES; "
                      "4b: plus bf16-as-loaded, the unquantized row)")
    peer.add_argument("--peer-formats", default=None, help="llama.cpp formats, comma list of f32,f16,q8_0,q4_0 (default all)")
    peer.add_argument("--thread-list", default="1,2", help="thread counts to measure at (default 1,2)")
    peer.add_argument("--work-dir", type=Path, default=None, help="4b: keep and reuse the checkpoint and GGUF files here")
    peer.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: the system's)")
    parser.add_argument("--peak-child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats_given, args.repeats = args.repeats is not None, args.repeats or 3
    if not args.peer:  # --peer picks its own per shape
        args.prompt, args.new = args.prompt or 128, args.new or 128
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        return _peak_child(*args.peak_child, args)
    if args.peer:
        if cuda:
            parser.error("--peer llama.cpp runs on the CPU only")
        import generate_peer

        return generate_peer.main(args)
    configs = (args.configs or ("4b" if cuda else "10m,130m")).split(",")
    print(f"machine: {machine()}; torch {torch.__version__}; {datetime.date.today()}")
    reports = []
    for name in configs:
        with tempfile.TemporaryDirectory() as tmp:
            reports.append(bench_config(name, args, Path(tmp)))
    kv = kv_32k_report()
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine(), torch=torch.__version__, configs=reports, kv_32k=kv),
                                        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
