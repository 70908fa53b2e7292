"""`openmedgemma ask` (one question, then exit) and `openmedgemma chat` (an interactive session).

Top-level imports stay light (no torch): the model is loaded only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openmedgemma.errors import ImageError, OpenMedGemmaError
from openmedgemma.imaging.pacs_cli import add_dicomweb_arguments, study_turn

CHAT_HELP = "commands: /image FILE (attach to your next message), /reset (forget the conversation), /quit"


def register(subparsers) -> None:
    ask = subparsers.add_parser("ask", help="answer one question about text and images, then exit",
                                description="Answer one question with a local MedGemma checkpoint.")  # fmt: skip
    _add_common(ask)
    ask.add_argument("question", help="the question (quote it)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--json", action="store_true", help="print a JSON object: answer, token counts, timings")
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
                        help="PNG, JPEG or DICOM image to include (repeatable)")  # fmt: skip
    parser.add_argument("--system", metavar="TEXT", help="system instruction")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU; on CPU a bf16 "
                        "checkpoint stays bf16 where the CPU has native bf16 (AMX / AVX-512-BF16), else fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weight-only decoder: a quarter of the weight memory; on x86 CPUs with AVX2 also "
                        "~2x faster decode (its kernel is built once, on first use, with the system C++ compiler)")
    parser.add_argument("--quantize", choices=["int8", "int8-dynamic"], default=None,
                        help="int8 (weight-only, as --int8) or int8-dynamic (CPU only: int8 activations too; "
                        "faster prefill, slower decode than int8, a little lossier)")  # fmt: skip
    parser.add_argument("--show-thinking", action="store_true", help="also print the model's thinking block")


# ---------------------------------------------------------------------- commands


def run_ask(args) -> int:
    _check_images(args.image)
    turn = study_turn(args, args.question) if args.dicomweb else _user(args.question, args.image)
    engine = _load(args)
    config = _config(args)
    messages = _system(args) + [turn]
    if args.stream and not args.json:
        result = _print_stream(engine, messages, config)
    else:
        [result] = engine.generate([messages], config)
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
            return 0
        _print_result(result, args.show_thinking)
    return 0


def run_chat(args) -> int:
    _check_images(args.image)
    engine = _load(args)
    config = _config(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"openmedgemma chat: {args.model} ({CHAT_HELP})", file=sys.stderr)
    history: list[dict] = []
    pending = list(args.image)
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
                history, pending = [], []
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
        turn = _user(line, pending)
        messages = (_system(args) if not history else []) + history + [turn]
        try:
            result = _print_stream(engine, messages, config)
        except OpenMedGemmaError as err:  # a bad image or an over-long conversation: report, keep the session
            print(f"openmedgemma chat: error: {err}", file=sys.stderr)
            continue
        if not history:
            history = _system(args)
        history += [turn, {"role": "assistant", "content": result.text}]
        pending = []
    return 0


def _print_stream(engine, messages, config):
    """Print the streamed answer; return the GenerationResult."""
    for delta in engine.stream(messages, config):
        print(delta, end="", flush=True)
    print(flush=True)
    return engine.last_result


# ---------------------------------------------------------------------- pieces


def _check_images(paths: list[str]) -> None:
    for path in paths:
        p = Path(path).expanduser()
        if not path:
            raise ImageError("/image needs a file name")
        if not p.exists():
            raise ImageError(f"{path}: file not found")
        if not p.is_file():
            raise ImageError(f"{path}: not a file")


def _load(args):
    import torch

    from openmedgemma.bundled import model_or_nano
    from openmedgemma.engine.dtype import choose_dtype
    from openmedgemma.engine.engine import Engine

    args.model = model_or_nano(args.model, "medgemma", f"openmedgemma {args.command}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = choose_dtype(args.model, args.dtype, device)  # refuses an upcast that cannot fit in memory
    quantize = args.quantize or ("int8" if args.int8 else None)
    return Engine.from_pretrained(args.model, dtype=dtype, device=device, quantize=quantize)


def _config(args):
    from openmedgemma.engine.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, show_thinking=args.show_thinking)  # fmt: skip


def _system(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _user(text: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


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
