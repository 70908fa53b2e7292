"""`openmedgemma ask` (one question, then exit) and `openmedgemma chat` (an interactive session).

`--image` takes 2-D images and volumes (a DICOM series folder, a zip of one, a multi-frame DICOM, a
NIfTI); `--slide` the whole-slide images of one case. Volumes and slides go into the prompt in the
MedGemma 1.5 layout (imaging.inputs): instruction, images with their labels, then the question.
Top-level imports stay light (no torch): the model is loaded only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openmedgemma.errors import ImageError, OpenMedGemmaError
from openmedgemma.imaging.pacs_cli import add_dicomweb_arguments, study_turn

# The modes themselves are read from engine.quant.MODES when the model loads (that module imports torch).
QUANTIZE_HELP = ("decoder weight format: int4 (weight-only, groups of 32: 4.5 bits per weight, the fastest CPU "
                 "decode), int8 (weight-only: a quarter of fp32's bytes, ~2x faster decode on x86 "
                 "CPUs with AVX2), int8-dynamic (CPU: int8 activations too, faster prefill), bf16 / fp16 (half the "
                 "bytes, closer to fp32), fp32 (the same values in the decode kernel's blocks: faster CPU decode), and any "
                 "other of engine.quant.MODES; the engine says on stderr which "
                 "kernels it picked for this CPU. CPU kernels are built once, on first use, with the system C++ "
                 "compiler. Default: bf16 for a model loaded in bfloat16 on a CPU, else none; 'none' keeps the "
                 "checkpoint's plain layers")  # fmt: skip
CHAT_HELP = "commands: /image FILE (attach to your next message), /reset (forget the conversation), /quit"
VOLUME_INSTRUCTION = ("The images below are the slices of one volume, in order along the patient axis, each "
                      "followed by its label SLICE n. Review them carefully.")  # fmt: skip
SLIDES_INSTRUCTION = ("The images below are tissue patches of the whole-slide images of one case, in spatial "
                      "order; with several slides, the patches of slide k follow the label SLIDE k. "
                      "Review them carefully.")  # fmt: skip


def register(subparsers) -> None:
    ask = subparsers.add_parser("ask", help="answer one question about text and images, then exit",
                                description="Answer one question with a local MedGemma checkpoint.")  # fmt: skip
    _add_common(ask)
    ask.add_argument("question", help="the question (quote it)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--json", action="store_true", help="print a JSON object: inputs (preset, slice / patch "
                     "counts), answer, token counts, timings")  # fmt: skip
    add_dicomweb_arguments(ask)
    ask.set_defaults(func=run_ask)

    chat = subparsers.add_parser("chat", help="an interactive chat session that keeps its history",
                                 description="Chat with a local MedGemma checkpoint. " + CHAT_HELP + ". "
                                 "Reads one message per line; works with piped input too.")  # fmt: skip
    _add_common(chat)
    chat.set_defaults(func=run_chat)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="checkpoint folder (config.json, safetensors, "
                        "tokenizer.json); default: the bundled nano model")  # fmt: skip
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image to include (repeatable): PNG, JPEG, TIFF, DICOM, or a volume: a DICOM "
                        "series folder, a zip of one, a multi-frame DICOM or a NIfTI (at most --max-slices "
                        "slices)")  # fmt: skip
    volume = parser.add_argument_group("volumes (--image)")
    volume.add_argument("--preset", help="CT window preset: medgemma (default) or report-v4")
    volume.add_argument("--max-slices", type=int, default=85, metavar="N", help="slices sampled from a volume "
                        "(default 85, MedGemma 1.5's limit)")  # fmt: skip
    volume.add_argument("--series-uid", metavar="UID",
                        help="SeriesInstanceUID to use when a folder or zip mixes series")  # fmt: skip
    volume.add_argument("--modality", help="modality of files without one (e.g. CT for a NIfTI in Hounsfield units)")
    slides = parser.add_argument_group("whole-slide images (--slide)")
    slides.add_argument("--slide", action="append", default=[], metavar="FILE",
                        help="a whole-slide image of the case (SVS, pyramidal TIFF, a DICOM WSI folder; "
                        "repeatable)")  # fmt: skip
    slides.add_argument("--magnification", type=float, default=10.0, metavar="X", help="objective magnification "
                        "the patches are cut at (default 10)")  # fmt: skip
    slides.add_argument("--max-patches", type=int, default=126, metavar="N",
                        help="patches in all, split across the slides (default 126, MedGemma 1.5's limit)")  # fmt: skip
    slides.add_argument("--patch-size", type=int, default=896, metavar="PX", help="patch side in pixels (default 896)")
    slides.add_argument("--patch-seed", type=int, default=0, metavar="S",
                        help="seed of the patch subsample (default 0)")  # fmt: skip
    parser.add_argument("--instruction", metavar="TEXT", help="text put before a volume's or slides' images "
                        "(default: a short description of the layout; '' for none)")  # fmt: skip
    parser.add_argument("--system", metavar="TEXT", help="system instruction")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                        help="greedy only: draft up to N tokens per step from text the prompt or answer already "
                        "holds and check them in one forward (same answer; faster when the answer copies its "
                        "input, e.g. rewriting a report; 0 = off, the default)")  # fmt: skip
    parser.add_argument("--prompt-lookup-ngram", type=int, default=3, metavar="K",
                        help="longest n-gram matched to find drafts (default 3)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU; on CPU a bf16 "
                        "checkpoint stays bf16 where the CPU has native bf16 (AMX / AVX-512-BF16), else fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--int8", action="store_true", help="as --quantize int8")
    parser.add_argument("--quantize", metavar="MODE", default=None, help=QUANTIZE_HELP)
    parser.add_argument("--compile", action="store_true", help="compile the decode step (on a CPU ahead of time, "
                        "kept on disk: the first run for a model shape and format waits ~30 s, later runs load it); "
                        "tokens then come faster (see benchmarks/RESULTS.md); worth it for chat and long answers")  # fmt: skip
    parser.add_argument("--show-thinking", action="store_true", help="also print the model's thinking block")


# ---------------------------------------------------------------------- commands


def run_ask(args) -> int:
    _check_images(args.image)
    _check_slides(args.slide)
    turn = study_turn(args, args.question) if args.dicomweb else _user(args.question, args.image, args)
    config = _config(args)  # a bad option is reported before the model loads
    engine = _load(args)
    messages = _system(args) + [turn]
    if args.stream and not args.json:
        result = _print_stream(engine, messages, config)
    else:
        [result] = engine.generate([messages], config)
        _print_warnings(result)
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
            return 0
        _print_result(result, args.show_thinking)
    return 0


def run_chat(args) -> int:
    _check_images(args.image)
    _check_slides(args.slide)
    config = _config(args)
    engine = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"openmedgemma chat: {args.model} ({CHAT_HELP})", file=sys.stderr)
    history: list[dict] = []
    pending, slides = list(args.image), list(args.slide)
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, pending, slides = [], [], []
                print("(conversation reset)", file=sys.stderr)
            elif command == "/image":
                try:
                    _check_images([rest.strip()])
                    pending.append(rest.strip())
                    print(f"(image attached to your next message: {rest.strip()})", file=sys.stderr)
                except OpenMedGemmaError as err:
                    print(f"openmedgemma chat: error: {err}", file=sys.stderr)
            else:
                print(f"openmedgemma chat: unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = _user(line, pending, args, slides)
        messages = (_system(args) if not history else []) + history + [turn]
        try:
            result = _print_stream(engine, messages, config)
        except OpenMedGemmaError as err:  # a bad image or an over-long conversation: report, keep the session
            print(f"openmedgemma chat: error: {err}", file=sys.stderr)
            continue
        if not history:
            history = _system(args)
        history += [turn, {"role": "assistant", "content": result.text}]
        pending, slides = [], []
    return 0


def _print_stream(engine, messages, config):
    """Print the streamed answer; return the GenerationResult."""
    for delta in engine.stream(messages, config):
        print(delta, end="", flush=True)
    print(flush=True)
    _print_warnings(engine.last_result)
    return engine.last_result


# ---------------------------------------------------------------------- pieces


def _check_images(paths: list[str]) -> None:
    for path in paths:
        p = Path(path).expanduser()
        if not path:
            raise ImageError("/image needs a file name")
        if not p.exists():
            raise ImageError(f"{path}: file not found")
        if not (p.is_file() or p.is_dir()):
            raise ImageError(f"{path}: not a file or folder")


def _check_slides(paths: list[str]) -> None:
    for path in paths:
        if not Path(path).expanduser().exists():
            raise ImageError(f"{path}: slide file not found")


def _load(args):
    import torch

    from openmedgemma.bundled import model_or_nano
    from openmedgemma.engine.dtype import choose_dtype
    from openmedgemma.engine.engine import Engine

    args.model = model_or_nano(args.model, "medgemma", f"openmedgemma {args.command}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.tokenizer import Tokenizer

    dtype = choose_dtype(args.model, args.dtype, device)  # refuses an upcast that cannot fit in memory
    mode = quantize_mode(args)
    model = MedGemma.from_pretrained(args.model, dtype=dtype, device=device)
    return Engine(model, Tokenizer.from_pretrained(args.model), quantize=bf16_default(mode, dtype, device, model),
                  compile=args.compile)  # fmt: skip


def quantize_mode(args) -> str | None:
    """--quantize MODE (or --int8), checked against engine.quant.MODES before the model loads. "none": keep the
    checkpoint's linear layers as they are (no default format either)."""
    from openmedgemma.engine.quant import MODES

    if args.quantize and args.int8 and args.quantize != "int8":
        raise OpenMedGemmaError(f"--int8 and --quantize {args.quantize} disagree; give one of them")
    mode = args.quantize or ("int8" if args.int8 else None)
    if mode is not None and mode not in (*MODES, "none"):
        raise OpenMedGemmaError(f"--quantize {mode}: unknown weight format; use one of {', '.join(MODES)} or none")
    return mode


def bf16_default(mode: str | None, dtype: str, device: str, model=None) -> str | None:
    """The weight format to run: `mode`, or for a model loaded in bfloat16 on a CPU "bf16", the engine's 16-bit
    layers (the same weights and bytes; its decode kernel streams them ~2.5x faster than torch's bf16 linear
    does: benchmarks/formats.py). "none" keeps the plain layers. The 16-bit layers are a re-laid-out copy made
    while the checkpoint is still mapped: where that copy does not fit in the memory left, the plain layers
    are kept (said on stderr)."""
    if mode is None and dtype == "bfloat16" and str(device).startswith("cpu"):
        if model is not None:
            from torch import nn

            from openmedgemma.engine.dtype import available_memory

            lm = model.language_model
            weights = [m.weight for m in lm.modules() if isinstance(m, nn.Linear)] + [lm.embed_tokens.weight]
            needed = sum(w.numel() * w.element_size() for w in weights)  # the layers and the head's copy
            if needed * 1.5 + (64 << 20) > available_memory():  # + one layer's temporaries, the kernels' library
                print(f"openmedgemma: the 16-bit decode layers need {needed / 1e9:.2f} GB more memory than is "
                      "free; running torch's bfloat16 layers (slower decode)", file=sys.stderr)  # fmt: skip
                return None
        return "bf16"
    return None if mode == "none" else mode


def _config(args):
    from openmedgemma.engine.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, show_thinking=args.show_thinking,
                            prompt_lookup_tokens=args.prompt_lookup,
                            prompt_lookup_ngram=args.prompt_lookup_ngram)  # fmt: skip


def _system(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _user(text: str, images: list[str], args, slides: list[str] | None = None) -> dict:
    """The user turn: [instruction], images (a volume as its slices), slide patches, then the question.

    Each image is a "volume" item, expanded by the engine (imaging.inputs), which also reports what it
    became (preset, slice and patch counts) in the result's `inputs`."""
    from openmedgemma.imaging.inputs import is_volume_source

    slides = args.slide if slides is None else slides
    if not images and not slides:
        return {"role": "user", "content": text}
    options = dict(preset=args.preset, max_slices=args.max_slices, series_uid=args.series_uid, modality=args.modality)
    content: list[dict] = [{"type": "volume", "volume": p, **options} for p in images]
    if slides:
        content.append({"type": "slides", "slides": list(slides), "magnification": args.magnification,
                        "max_patches": args.max_patches, "patch_size": args.patch_size,
                        "seed": args.patch_seed})  # fmt: skip
    instruction = args.instruction
    if instruction is None:
        parts = [VOLUME_INSTRUCTION] if any(is_volume_source(p) for p in images) else []
        instruction = " ".join(parts + ([SLIDES_INSTRUCTION] if slides else []))
    before = [{"type": "text", "text": instruction}] if instruction else []
    return {"role": "user", "content": before + content + [{"type": "text", "text": text}]}


def _print_warnings(result) -> None:
    for summary in getattr(result, "inputs", None) or []:
        for warning in summary.get("warnings", ()):
            print(f"openmedgemma: warning: {summary['source']}: {warning}", file=sys.stderr)


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


def _print_result(result, show_thinking: bool) -> None:
    if show_thinking and result.thought:
        print(f"[thinking]\n{result.thought}\n[/thinking]\n")
    print(result.text)
