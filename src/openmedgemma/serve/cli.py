"""`openmedgemma serve`: the OpenAI-compatible server (FastAPI + uvicorn) over continuous batching.

Binds 127.0.0.1 by default and refuses a non-loopback address without an API key. The socket is bound
before the models load, so `/health` answers 503 until they are ready; with `--port 0` a free port is
picked and the line `openmedgemma serve: listening on http://HOST:PORT` says which. SIGTERM / Ctrl-C
stop accepting connections, let the requests in flight finish, then exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket

from openmedgemma.errors import OpenMedGemmaError

log = logging.getLogger("openmedgemma.serve")


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve the models over an OpenAI-compatible HTTP API",
                                  description=__doc__.split("\n\n", 1)[1].strip())  # fmt: skip
    serve.add_argument("--model", metavar="DIR", help="MedGemma checkpoint folder (default: the bundled nano)")
    serve.add_argument("--embedding-model", metavar="DIR",
                       help="MedSigLIP folder for /v1/embeddings (default: nano when --model is not given)")
    serve.add_argument("--served-model-name", metavar="NAME", help="model id clients use (default: folder name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument("--api-key", default=os.environ.get("OPENMEDGEMMA_API_KEY"), metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (default: $OPENMEDGEMMA_API_KEY)")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=16, metavar="N", help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, default=256, metavar="N",
                       help="requests waiting beyond the batch before 503 (default 256)")
    serve.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="prompt + answer tokens per sequence (default: the model's context, at most 8192); "
                       "every batch row holds this many, so it sizes the KV cache")
    serve.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cap on a request's max_tokens")
    serve.add_argument("--prefill-budget", type=int, default=512, metavar="N",
                       help="prompt tokens prefilled per scheduler step (smaller: smoother streams)")
    serve.add_argument("--prefix-cache-mb", type=int, default=256, metavar="MB",
                       help="memory for reusing prompt prefixes (0: off)")
    serve.add_argument("--max-body-mb", type=int, default=64, metavar="MB", help="largest request body")
    serve.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as `ask`: bf16 on GPU; on CPU a bf16 "
                       "checkpoint stays bf16 where the CPU has native bf16, else float32)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--int8", action="store_true", help="as --quantize int8")
    serve.add_argument("--quantize", metavar="MODE", default=None, help="decoder weight format, as `ask --quantize`: "
                       "int8, int8-dynamic, bf16, fp16 or any other of engine.quant.MODES")  # fmt: skip
    serve.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="CPU fp32: keep a second copy of the decoder's linear weights in oneDNN's layout, so that "
                       "batched decode steps cost little more than one row (default on when it fits in half the free "
                       "memory; the server logs its size)")  # fmt: skip
    serve.add_argument("--dicomweb", metavar="URL",
                       help="a DICOMweb store (PACS) whose studies requests may name as image_url "
                       "'dicomweb:studies/UID[/series/UID]'; credentials from $OPENMEDGEMMA_DICOMWEB_TOKEN or "
                       "$OPENMEDGEMMA_DICOMWEB_USER / $OPENMEDGEMMA_DICOMWEB_PASSWORD")  # fmt: skip
    serve.add_argument("--dicomweb-timeout", type=float, default=30.0, metavar="S",
                       help="seconds to wait for the DICOMweb store (default 30)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from openmedgemma.engine.cli import quantize_mode
    from openmedgemma.serve.app import ServerConfig, ServerState, create_app

    _check_host(args.host, args.api_key)
    quantize_mode(args)  # an unknown --quantize fails now, not in the loader thread
    # request ids, sizes and timings; never prompt text or pixels (uvicorn's access log only at debug)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    config = ServerConfig(api_key=args.api_key or None, max_body_bytes=args.max_body_mb << 20,
                          max_tokens_cap=args.max_tokens, dicomweb=_dicomweb(args))  # fmt: skip
    state = ServerState(config)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    app = create_app(state, loader=lambda s: load(s, args))
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=None,
                                           access_log=args.log_level == "debug"))  # fmt: skip
    print(f"openmedgemma serve: listening on http://{shown}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0


def _dicomweb(args):
    """The store of --dicomweb (credentials from the environment), or None."""
    if not args.dicomweb:
        return None
    from openmedgemma.imaging.pacs_cli import source_from_args

    args.dicomweb_cache = None  # a server keeps no patient data on disk
    return source_from_args(args)


def load(state, args) -> None:
    """Load the chat and embedding models and start the scheduler (runs in a thread at startup)."""
    from pathlib import Path

    from openmedgemma.bundled import model_or_nano, nano_path
    from openmedgemma.engine.engine import Engine
    from openmedgemma.engine.scheduler import Scheduler
    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.tokenizer import Tokenizer
    from openmedgemma.serve.app import ServedModel

    from openmedgemma.engine.cli import bf16_default, quantize_mode
    from openmedgemma.engine.dtype import choose_dtype

    device = _device(args.device)
    chat_path = model_or_nano(args.model, "medgemma", "openmedgemma serve")
    embed_path = args.embedding_model or (None if args.model else nano_path("medsiglip"))
    dtype = choose_dtype(chat_path, args.dtype, device)  # as `ask`: refuses an upcast that cannot fit
    mode = quantize_mode(args)
    model = MedGemma.from_pretrained(chat_path, dtype=dtype, device=device)
    quantize = bf16_default(mode, dtype, device, model)
    prepack = args.prepack_weights and not quantize and _fits_twice(model)
    engine = Engine(model, Tokenizer.from_pretrained(chat_path), quantize=quantize, prepack_weights=prepack)
    if engine.decoder and engine.decoder.prepack:
        log.info("decode weights prepacked for oneDNN: +%.2f GiB (--no-prepack-weights keeps one copy)",
                 engine.decoder.prepacked_bytes / 2**30)  # fmt: skip
    state.engine = engine
    state.scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue,
                                max_model_len=args.max_model_len, prefill_budget=args.prefill_budget,
                                prefix_cache_bytes=args.prefix_cache_mb << 20, observer=state.metrics).start()  # fmt: skip
    log.info("KV cache: %d rows x %d tokens = %.2f GiB (--max-batch, --max-model-len)", args.max_batch,
             state.scheduler.max_model_len, state.scheduler.kv_bytes / 2**30)  # fmt: skip
    nano = Path(chat_path).resolve() == nano_path("medgemma").resolve()
    name = args.served_model_name or Path(chat_path).resolve().name
    state.models[name] = ServedModel(name, "chat", str(chat_path), nano)
    if embed_path is not None:
        from openmedgemma.eval.embedder import MedSigLIPEmbedder

        e_dtype = choose_dtype(embed_path, args.dtype, device)
        state.embedder = MedSigLIPEmbedder.from_pretrained(embed_path, dtype=e_dtype, device=device)
        e_nano = Path(embed_path).resolve() == nano_path("medsiglip").resolve()
        state.models[Path(embed_path).resolve().name] = ServedModel(Path(embed_path).resolve().name, "embedding",
                                                                    str(embed_path), e_nano)  # fmt: skip


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _fits_twice(model) -> bool:
    """Whether a second copy of the decoder's linear weights takes at most half the free memory."""
    import psutil
    from torch import nn

    need = sum(m.weight.numel() * m.weight.element_size() for m in model.language_model.modules()
               if isinstance(m, nn.Linear))  # fmt: skip
    if need > psutil.virtual_memory().available / 2:
        log.warning("not prepacking the decode weights: %.2f GiB would not fit comfortably", need / 2**30)
        return False
    return True


def _check_host(host: str, api_key: str | None) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise OpenMedGemmaError(f"--host {host!r}: give an IP address (127.0.0.1, ::1, 0.0.0.0, ...)") from None
    if not loopback and not api_key:
        raise OpenMedGemmaError(
            f"--host {host} would let other machines reach the model and the images sent to it; "
            "set --api-key (or $OPENMEDGEMMA_API_KEY) to do that"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    except OSError as err:
        sock.close()
        raise OpenMedGemmaError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


