"""Prompt-lookup decoding: greedy decode tokens/s with it on vs off (same run), and its acceptance rate.

    python benchmarks/prompt_lookup.py --threads 1

(a) The bundled nano model (models/medgemma-nano) on real VQA-RAD questions with their images (from
the shared data) and on a report-style prompt that copies ("Rewrite this radiology report with
headings:" + a report). (b) A random-weight Gemma 3 text decoder of benchmarks/generate.py's 130m shape
(transformers' random init), on random prompt tokens (nothing to copy: the overhead) and on a prompt
repeating one 16-token pattern (copying forced).

Each prompt runs N new tokens with stop tokens off (nano's real answers end after a few tokens,
too few to time), alternating off / on for --repeats rounds; decode tokens/s = (N - 1) / the stream's
decode seconds (after the first token), medians. Both runs' tokens are checked identical.
Acceptance = draft tokens kept / draft tokens checked; tokens per forward = (N - 1) / decode forwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402

from openmedgemma.engine import Engine, GenerationConfig, TokenStream  # noqa: E402

REPORT = ("FINDINGS: The heart size is normal. The mediastinal and hilar contours are unremarkable. There is a "
          "small left pleural effusion with adjacent atelectasis. No pneumothorax. No focal consolidation. "
          "The osseous structures are intact. IMPRESSION: Small left pleural effusion with adjacent "
          "atelectasis. No acute cardiopulmonary process.")  # fmt: skip


class RandomDrafts:
    """Drafts of random tokens at every step (the model practically never agrees): the worst case, every step a
    rejected verify forward of 1 + k tokens."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def append(self, token: int) -> None:
        pass

    def draft(self, k: int) -> list[int]:
        return torch.randint(3, self.vocab, (k,), generator=self.g).tolist()


def time_prompt(model, decoder, ids: list[int], features, new: int, lookup: int, ngram: int, repeats: int,
                random_drafts: bool = False) -> dict:  # fmt: skip
    """Median decode tokens/s off and on, and the on runs' counters."""
    rates: dict[int, list[float]] = {0: [], lookup: []}
    tokens: dict[int, list[int]] = {}
    counts = {}
    for _ in range(repeats):
        for k in (0, lookup):
            config = GenerationConfig(max_new_tokens=new, prompt_lookup_tokens=k, prompt_lookup_ngram=ngram)
            forwards = [0]

            def head(hidden, forwards=forwards):
                forwards[0] += 1
                return model.logits(hidden)

            stream = TokenStream(model, [ids], [features], config, fast=decoder, head=head)
            if random_drafts and k:
                stream._lookup = lambda first: RandomDrafts(model.config.text.vocab_size)
            out = [t[0] for t in stream]
            rates[k].append((new - 1) / stream.decode_seconds)
            if tokens.setdefault(k, out) != out:
                raise RuntimeError("greedy tokens changed between repeats")
            if k:
                counts = dict(drafted=stream.drafted, accepted=stream.accepted, forwards=forwards[0] - 1)
    if tokens[0] != tokens[lookup]:
        raise RuntimeError("prompt lookup changed the greedy tokens")
    off, on = statistics.median(rates[0]), statistics.median(rates[lookup])
    return dict(off_tok_s=off, on_tok_s=on, ratio=on / off, acceptance=counts["accepted"] / max(counts["drafted"], 1),
                tokens_per_forward=(new - 1) / max(counts["forwards"], 1), **counts)  # fmt: skip


def real_answer(engine: Engine, ids: list[int], features, lookup: int, ngram: int) -> str:
    """The answer as the Engine ends it (at a stop token), on and off: its length and the drafts checked."""
    stops, outs = set(engine.tokenizer.stop_ids), []
    for k in (0, lookup):
        config = GenerationConfig(max_new_tokens=256, prompt_lookup_tokens=k, prompt_lookup_ngram=ngram)
        stream = TokenStream(engine.model, [ids], [features], config, fast=engine.decoder)
        out = []
        for row in stream:
            out.append(row[0])
            stream.done[0] = row[0] in stops
        outs.append(out)
    if outs[0] != outs[1]:
        raise RuntimeError("prompt lookup changed the greedy answer")
    return (f"{'':54} real answer {engine.tokenizer.decode(outs[0][:-1])!r}: {len(outs[0])} tokens, identical "
            f"on/off; drafts kept {stream.accepted}/{stream.drafted}")  # fmt: skip


def nano_prompts(engine: Engine, data: Path, n_questions: int) -> list[tuple[str, list[int], torch.Tensor | None]]:
    folder = data / "vqa_rad"
    items = json.loads((folder / "VQA_RAD Dataset Public.json").read_text())
    prompts = []
    for item in [x for x in items if x["phrase_type"] == "test_freeform"][:n_questions]:
        image = folder / "VQA_RAD Image Folder" / item["image_name"]
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": item["question"]}]}]  # fmt: skip
        p = engine.prepare(messages)
        prompts.append((f"VQA-RAD: {item['question']}", p.ids, engine._features_for([p])[0]))
    p = engine.prepare([{"role": "user", "content": f"Rewrite this radiology report with headings: {REPORT}"}])
    prompts.append(("report rewrite", p.ids, None))
    return prompts


def random_130m(folder: Path):
    from generate import build

    from openmedgemma import MedGemma

    build("130m", torch.float32, "cpu", folder)
    return MedGemma.from_pretrained(folder)


def drafting_us(ngram: int) -> float:
    """Microseconds per generated token spent in the draft index (append + draft), no match found."""
    from openmedgemma.engine.lookup import PromptLookup

    text = list(range(1000, 1256))
    look = PromptLookup(ngram, text[:128])
    t = time.perf_counter()
    for token in text[128:]:
        look.append(token)
        look.draft(8)
    return (time.perf_counter() - t) / 128 * 1e6


def report(name: str, label: str, r: dict) -> None:
    print(f"{name:5} {label[:48]:48} off {r['off_tok_s']:7.1f}  on {r['on_tok_s']:7.1f} tok/s  ratio "
          f"{r['ratio']:.2f}x  acceptance {r['acceptance']:.2f} ({r['accepted']}/{r['drafted']})  "
          f"tokens/forward {r['tokens_per_forward']:.2f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=8, help="draft tokens per step (prompt_lookup_tokens)")
    parser.add_argument("--ngram", type=int, default=3, help="prompt_lookup_ngram")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=4, help="VQA-RAD questions for the nano model")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--skip-130m", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {describe()}")
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}; {args.new} new tokens, greedy, "
          f"prompt_lookup_tokens {args.lookup}, ngram {args.ngram}, median of {args.repeats}")  # fmt: skip

    from openmedgemma.bundled import nano_path

    engine = Engine.from_pretrained(nano_path("medgemma"))
    with torch.inference_mode():
        for label, ids, feats in nano_prompts(engine, args.data, args.questions):
            report("nano", label, time_prompt(engine.model, engine.decoder, ids, feats, args.new, args.lookup,
                                              args.ngram, args.repeats))  # fmt: skip
            print(real_answer(engine, ids, feats, args.lookup, args.ngram))
    if args.skip_130m:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = random_130m(Path(tmp))
    from openmedgemma.engine.fast import DecoderRunner

    decoder = DecoderRunner(model.language_model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.text.vocab_size
    pattern = torch.randint(3, vocab, (16,), generator=g).tolist()
    random_prompt = torch.randint(3, vocab, (128,), generator=g).tolist()
    prompts = [("random tokens", random_prompt, False), ("a 16-token pattern x 8 (copying)", pattern * 8, False),
               ("random tokens, random drafts (worst case)", random_prompt, True)]  # fmt: skip
    with torch.inference_mode():
        for label, ids, random_drafts in prompts:
            report("130m", label, time_prompt(model, decoder, ids, None, args.new, args.lookup, args.ngram,
                                              args.repeats, random_drafts))  # fmt: skip
    print(f"drafting itself (PromptLookup.append + draft, {args.ngram}-grams, 256-token text): "
          f"{drafting_us(args.ngram):.1f} us per token")
    print(f"load average after {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
