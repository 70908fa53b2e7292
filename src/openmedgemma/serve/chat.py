"""POST /v1/chat/completions: OpenAI messages -> scheduler requests -> answers or SSE chunks.

Where a request becomes tokens: `_conversation` turns OpenAI messages (text, image_url parts, tool calls,
tool results) into the engine's chat messages, `Engine.prepare` tokenizes them, and each of the `n`
choices is one scheduler `Request`. Defaults: greedy unless `temperature` > 0 (the report's setting);
`max_tokens` up to the context. Streaming sends the role first, then content deltas, then (with tools)
the parsed tool calls, the thinking block as `reasoning_content`, the finish reason, the usage chunk if
`stream_options.include_usage`, and `[DONE]`. A client that goes away cancels its sequences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from openmedgemma.engine.sampling import GenerationConfig
from openmedgemma.engine.sequences import CANCELLED, MAX_NEW_TOKENS, Delta, Finished
from openmedgemma.engine.sequences import Request as EngineRequest
from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.serve import tools as tooling
from openmedgemma.serve.app import APIError, ServerState, ready_state
from openmedgemma.serve.dicomweb import content_from_dicomweb, is_dicomweb_url
from openmedgemma.serve.media import MediaError, content_from_image_url
from openmedgemma.serve.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs,
    ChunkChoice, DeltaMessage, TokenLogprobOut, TopLogprob, Usage,
)  # fmt: skip

router = APIRouter()
log = logging.getLogger("openmedgemma.serve")
FINISH = {"stop_token": "stop", "stop_string": "stop", MAX_NEW_TOKENS: "length"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ServerState = Depends(ready_state)):
    served = state.model(body.model, "chat")
    functions, forced = tooling.check_tools(body.tools, body.tool_choice)
    engine, scheduler = state.engine, state.scheduler
    conversation = await run_in_threadpool(_conversation, body, state, functions, forced)
    prompt = await run_in_threadpool(engine.prepare, conversation)
    configs = _configs(body, len(prompt.ids), scheduler.max_model_len, state.config.max_tokens_cap)
    run = _Run(state, prompt, configs, body.top_logprobs or 0 if body.logprobs else None, body.ignore_eos)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log.info("%s: %d prompt tokens, %d image(s), n=%d, stream=%s", rid, len(prompt.ids), len(prompt.pixels),
             body.n, body.stream)  # fmt: skip
    run.submit(asyncio.get_running_loop())
    if body.stream:
        return StreamingResponse(_sse(run, body, served.name, rid, functions), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    try:
        finals = await run.wait(request)
    finally:
        run.cancel()
    choices = [_choice(i, run.texts[i], f, run.lps[i], functions, state, body) for i, f in enumerate(finals)]
    usage = run.usage()
    run.log(rid)
    return ChatCompletion(id=rid, created=int(time.time()), model=served.name, choices=choices, usage=usage)


class _Run:
    """The n sequences of one request and their events, handed from the scheduler thread to asyncio."""

    def __init__(self, state: ServerState, prompt, configs: list[GenerationConfig], logprobs: int | None,
                 ignore_eos: bool = False):  # fmt: skip
        self.state, self.prompt, self.configs, self.logprobs = state, prompt, configs, logprobs
        self.ignore_eos = ignore_eos
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.texts = [""] * len(configs)
        self.finals: list[Finished | None] = [None] * len(configs)
        self.lps: list[list] = [[] for _ in configs]
        self.t0 = time.perf_counter()

    def submit(self, loop) -> None:
        for i, config in enumerate(self.configs):
            def deliver(event, i=i):
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

            request = EngineRequest(self.prompt, config, deliver, logprobs=self.logprobs, ignore_eos=self.ignore_eos)
            try:
                self.state.scheduler.submit(request)
            except OpenMedGemmaError:
                self.cancel()
                raise
            self.requests.append(request)

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    def record(self, i: int, event) -> None:
        self.texts[i] += event.text
        if event.logprobs:
            self.lps[i] += event.logprobs
        if isinstance(event, Finished):
            self.finals[i] = event
            if event.error is not None:
                raise APIError(500, f"generation failed: {event.error}", None, "generation_failed", "server_error")

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finals)

    async def wait(self, request: Request) -> list[Finished]:
        """All choices' final events; cancels them if the client disconnects first."""
        checked = time.monotonic()
        while not self.done:
            try:
                i, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                self.record(i, event)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked >= 0.5:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise APIError(499, "client disconnected", None, "client_closed", "server_error")
        return self.finals  # type: ignore[return-value]

    def usage(self) -> Usage:
        completion = sum(len(f.result.token_ids) for f in self.finals if f is not None and f.result is not None)
        prompt = len(self.prompt.ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def log(self, rid: str) -> None:
        reasons = ",".join(f.reason for f in self.finals if f is not None)
        log.info("%s: done in %.3fs, %d new tokens, finish=%s", rid, time.perf_counter() - self.t0,
                 self.usage().completion_tokens, reasons)  # fmt: skip


async def _sse(run: _Run, body: ChatCompletionRequest, model: str, rid: str, functions):
    created = int(time.time())

    def chunk(choices, usage=None) -> str:
        data = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {data.model_dump_json(exclude_none=True)}\n\n"

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    buffer_text = bool(functions)  # a tool call is known only at the end: send content then
    try:
        yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(len(run.configs))])  # fmt: skip
        while not run.done:
            i, event = await run.queue.get()
            try:
                run.record(i, event)
            except APIError as err:
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
                return
            lps = _logprobs(event.logprobs, run.state) if event.logprobs else None
            if isinstance(event, Delta):
                if (event.text and not buffer_text) or lps:
                    yield chunk([ChunkChoice(index=i, delta=DeltaMessage(content=None if buffer_text else event.text),
                                             logprobs=lps)])  # fmt: skip
                continue
            delta = DeltaMessage()
            if buffer_text:
                content, calls = tooling.parse_tool_calls(run.texts[i], functions)
                delta.content = content
                delta.tool_calls = [dict(c, index=k) for k, c in enumerate(calls)] or None
            elif event.text:
                delta.content = event.text
            thought = event.result.thought if event.result is not None else None
            if thought and not body.show_thinking:
                delta.reasoning_content = thought
            finish = _finish_reason(event, bool(buffer_text and delta.tool_calls))
            yield chunk([ChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=lps)])
        if include_usage:
            yield chunk([], usage=run.usage())
        yield "data: [DONE]\n\n"
        run.log(rid)
    finally:  # normal end, or the client went away (the task is cancelled): free the slots
        run.cancel()


def _conversation(body: ChatCompletionRequest, state: ServerState, functions, forced) -> list[dict]:
    """OpenAI messages -> engine chat messages (images decoded, tools rendered)."""
    preset = body.ct_preset
    if preset is not None:
        from openmedgemma.imaging.windowing import PRESETS

        if preset not in PRESETS:
            raise APIError(400, f"ct_preset {preset!r} is unknown; choose one of {sorted(PRESETS)}", "ct_preset")
    messages, images = [], 0
    for m_index, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for p_index, part in enumerate(content):
                field = f"messages[{m_index}].content[{p_index}]"
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if is_dicomweb_url(url):  # a study on the store `serve --dicomweb` names
                        items = content_from_dicomweb(url, state.config.dicomweb, preset=preset,
                                                      field=f"{field}.image_url",
                                                      limits=state.config.media)  # fmt: skip
                    else:
                        items = content_from_image_url(url, preset=preset, field=f"{field}.image_url",
                                                       limits=state.config.media)  # fmt: skip
                    images += sum(1 for item in items if item["type"] == "image")
                    if images > state.config.max_images:
                        raise MediaError(f"{field}: more than {state.config.max_images} images in one request "
                                         "(a series counts its sampled slices)", field)  # fmt: skip
                    parts += items
                else:
                    raise APIError(400, f"{field}: unsupported content part type {kind!r} (text, image_url)",
                                   f"{field}.type")  # fmt: skip
            content = parts
        if message.role in ("system", "developer") and isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p["type"] == "text")
        messages.append({"role": message.role, "content": content, "tool_calls": message.tool_calls})
    if functions or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return tooling.render_messages(messages, functions, forced)
    return [{"role": m["role"], "content": m["content"] if m["content"] is not None else ""} for m in messages]


def _configs(body: ChatCompletionRequest, prompt_tokens: int, context: int, cap: int | None) -> list[GenerationConfig]:
    cap = min(cap or context, context)
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > cap:
        raise APIError(400, f"max_tokens {asked} is above this server's limit of {cap}", "max_tokens")
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens, the model's context is {context} tokens",
                       "messages", "context_length_exceeded")  # fmt: skip
    max_new = asked or min(cap, context - prompt_tokens)
    if prompt_tokens + max_new > context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {max_new}: "
                       f"{prompt_tokens + max_new} > the model's context of {context} tokens", "max_tokens",
                       "context_length_exceeded")  # fmt: skip
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    temperature = body.temperature or 0.0
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    top_p = body.top_p if body.top_p is not None and body.top_p < 1 else None
    configs = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        configs.append(GenerationConfig(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                        seed=seed, stop_strings=tuple(stops), show_thinking=body.show_thinking))
    return configs


def _choice(index: int, text: str, final: Finished, logprobs: list, functions, state, body) -> Choice:
    content, calls = tooling.parse_tool_calls(text.strip(), functions) if functions else (text.strip(), [])
    thought = final.result.thought if final.result is not None else None
    message = AssistantMessage(content=content, tool_calls=calls or None,
                               reasoning_content=thought if thought and not body.show_thinking else None)  # fmt: skip
    lps = _logprobs(logprobs, state) if body.logprobs else None
    return Choice(index=index, message=message, finish_reason=_finish_reason(final, bool(calls)), logprobs=lps)


def _finish_reason(final: Finished, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return FINISH.get(final.reason, "stop") if final.reason != CANCELLED else "abort"


def _logprobs(items, state: ServerState) -> ChoiceLogprobs:
    tok = state.engine.tokenizer

    def piece(token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False)

    out = []
    for lp in items:
        text = piece(lp.token_id)
        alts = [TopLogprob(token=piece(t), logprob=v, bytes=list(piece(t).encode())) for t, v in lp.top]
        out.append(TokenLogprobOut(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=alts))
    return ChoiceLogprobs(content=out)
