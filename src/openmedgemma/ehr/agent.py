"""The EHR navigator: a fixed pipeline over the record tools, on any chat model.

    manifest -> relevant resource types -> per-type retrieval (one tool call each) -> per-type fact summary
    with [Type/id] citations -> final answer

(prompts in prompts.py). The model is anything with the evaluation's `ChatModel.generate(batch, *,
max_new_tokens, seed)`: the in-process engine (`openmedgemma.eval.chat_model.MedGemmaChatModel`) or an
OpenAI-compatible endpoint. When the model also has `complete(messages, tools=..., ...)` (the endpoint
adapter), the retrieval step uses the server's native `tools`; if the server rejects them, the JSON-in-prompt
protocol takes over (noted in the trace). Steps of one kind are sent as one batch.

Context: every prompt is measured (`model.count_tokens` when the model has it, else ~2.5 characters per
token, a cautious figure for JSON full of ids) against `context_tokens` (`model.context_tokens`, else the
caller's figure). A type whose resources do not fit is summarised in parts, and the parts merged; the
summaries are merged again if they do not fit the answer prompt. Nothing is cut silently: a single resource
longer than a prompt's room is split across parts, and the trace says so.

A structured step (type list, tool call) that cannot be parsed is asked again once with the reason; a second
failure is recorded in the trace and the cautious default is taken (all types; the whole type).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from openmedgemma.ehr import prompts
from openmedgemma.ehr.fhir import CLINICAL_TYPES
from openmedgemma.ehr.parsing import ReplyError, answer_text, citations, parse_tool_call, parse_type_list
from openmedgemma.ehr.store import RecordStore
from openmedgemma.ehr.tools import TOOL_SCHEMAS, Tools
from openmedgemma.errors import ConfigError

CHARS_PER_TOKEN = 2.5
DEFAULT_CONTEXT_TOKENS = 8192
TEMPLATE_MARGIN = 16  # chat-format tokens around a user turn (<start_of_turn>user ... <start_of_turn>model)
RESOURCE_TOOL = "get_patient_fhir_resource"
_RESOURCE_SCHEMA = next(t for t in TOOL_SCHEMAS if t["function"]["name"] == RESOURCE_TOOL)


@dataclass
class NavigatorResult:
    patient_id: str
    question: str
    answer: str
    citations: list[str]  # Type/id cited in the answer that the navigator did retrieve
    unverified_citations: list[str]  # cited but never retrieved (a hallucinated or mistyped reference)
    evidence: list[str]  # every Type/id the tools returned
    summaries: dict[str, str]
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Navigator:
    def __init__(self, model: Any, store: RecordStore, *, max_new_tokens: int = 512, seed: int = 0,
                 context_tokens: int | None = None, use_tools: bool | None = None):  # fmt: skip
        if not callable(getattr(model, "generate", None)):
            raise ConfigError(f"{type(model).__name__} is not a chat model (it has no generate method)")
        self.model, self.store, self.tools = model, store, Tools(store)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.context_tokens = getattr(model, "context_tokens", None) or context_tokens or DEFAULT_CONTEXT_TOKENS
        if self.context_tokens <= max_new_tokens + 256:
            raise ConfigError(f"a context of {self.context_tokens} tokens leaves no room for prompts after "
                              f"{max_new_tokens} new tokens; lower max_new_tokens")  # fmt: skip
        self.use_tools = callable(getattr(model, "complete", None)) if use_tools is None else use_tools

    # ------------------------------------------------------------------ measuring

    def count(self, text: str) -> int:
        counter = getattr(self.model, "count_tokens", None)
        return counter(text) if callable(counter) else math.ceil(len(text) / CHARS_PER_TOKEN)

    def room(self, template: str, **fields: str) -> int:
        """Tokens left for the data field of `template` filled with `fields` (the data field empty)."""
        used = self.count(template.format(**fields))
        return self.context_tokens - self.max_new_tokens - used - TEMPLATE_MARGIN

    def pack(self, lines: list[str], room: int, trace: list, where: str) -> list[str]:
        """Lines grouped into parts of at most `room` tokens; a line longer than `room` is split (and traced)."""
        parts, current, used = [], [], 0
        pending = list(reversed(lines))
        while pending:
            line = pending.pop()
            size = self.count(line) + 1
            if size > room and "\n" in line:  # a multi-line text (a summary): split at its lines first
                pending.extend(reversed(line.split("\n")))
                continue
            if size > room:
                step = max(1, int(len(line) * room / size) - 1)
                pieces = [line[i : i + step] for i in range(0, len(line), step)]
                trace.append({"step": "split", "where": where, "note": f"one line of {size} tokens split in "
                              f"{len(pieces)} pieces to fit a room of {room} tokens"})  # fmt: skip
                for piece in pieces:
                    parts.extend(["\n".join(current)] if current else [])
                    current, used = [piece], self.count(piece)
                continue
            if current and used + size > room:
                parts.append("\n".join(current))
                current, used = [], 0
            current.append(line)
            used += size
        return parts + (["\n".join(current)] if current else [])

    # ------------------------------------------------------------------ model calls

    def generate(self, prompts_: list[str]) -> list[str]:
        if not prompts_:
            return []
        batch = [[{"role": "user", "content": p}] for p in prompts_]
        return self.model.generate(batch, max_new_tokens=self.max_new_tokens, seed=self.seed)

    def structured(self, step: str, prompt_list: list[str], parse, trace: list, labels: list[str]) -> list:
        """Generate, parse, ask again once with the reason for the replies that failed; None where both failed."""
        replies = self.generate(prompt_list)
        results: list = [None] * len(prompt_list)
        retry = []
        for i, reply in enumerate(replies):
            entry = {"step": step, "label": labels[i], "prompt_tokens": self.count(prompt_list[i]), "reply": reply}
            try:
                results[i] = ("ok", parse(reply))
            except ReplyError as err:
                entry["error"] = str(err)
                retry.append((i, prompt_list[i] + prompts.RETRY.format(problem=err)))
            trace.append(entry)
        for (i, prompt), reply in zip(retry, self.generate([p for _, p in retry])):
            entry = {"step": step, "label": labels[i], "retry": True, "prompt_tokens": self.count(prompt),
                     "reply": reply}  # fmt: skip
            try:
                results[i] = ("ok", parse(reply))
            except ReplyError as err:
                entry["error"] = f"{err}; failed twice, taking the default"
            trace.append(entry)
        return [r[1] if r else None for r in results]

    def native_tool_calls(self, prompt_list: list[str], labels: list[str], trace: list) -> list | None:
        """Tool calls through the server's `tools` support (asked again once when the reply cannot be read);
        None when the server does not take tools."""
        results = []
        for prompt, label in zip(prompt_list, labels):
            args = None
            for attempt in range(2):
                try:
                    reply = self.model.complete([{"role": "user", "content": prompt}], tools=[_RESOURCE_SCHEMA],
                                                tool_choice="auto", temperature=0.0, max_tokens=self.max_new_tokens,
                                                seed=self.seed)  # fmt: skip
                except Exception as err:  # noqa: BLE001 - any refusal of `tools` falls back to the JSON protocol
                    trace.append({"step": "tool_call", "label": label, "note": "the server did not accept tools "
                                  f"({type(err).__name__}); using the JSON protocol"})  # fmt: skip
                    self.use_tools = False
                    return None
                entry = {"step": "tool_call", "label": label, "native": True, "prompt_tokens": self.count(prompt),
                         "reply": reply.get("content") or "", "tool_calls": reply.get("tool_calls") or []}  # fmt: skip
                if attempt:
                    entry["retry"] = True
                trace.append(entry)
                try:
                    args = _native_arguments(reply)
                    break
                except ReplyError as err:
                    entry["error"] = f"{err}; failed twice, taking the default" if attempt else str(err)
                    prompt += prompts.RETRY.format(problem=err)
            results.append(args)
        return results


    # ------------------------------------------------------------------ the pipeline

    def ask(self, patient_id: str, question: str, *, answer_format: str = "",
            types: list[str] | None = None) -> NavigatorResult:  # fmt: skip
        """Answer `question` about the patient; `types` limits the record to those resource types."""
        trace: list[dict] = []
        self.store.patient(patient_id)  # a clear error for an unknown patient, before any model call
        unknown = sorted(set(types or ()) - set(CLINICAL_TYPES))
        if unknown:
            raise ConfigError(f"unknown resource types {unknown}; known: {', '.join(CLINICAL_TYPES)}")
        manifest = self.tools.call("get_patient_manifest", {"patient_id": patient_id})
        trace.append(_tool_entry(manifest))
        rows = self.tools.manifest_rows(patient_id)
        if types:
            rows = {t: r for t, r in rows.items() if t in types}
            manifest = self.tools.manifest(patient_id, only=types)
        types = list(rows)
        common = {"patient_id": patient_id, "question": question}

        # 1. which types
        manifest_text = manifest.text
        if self.room(prompts.SELECT_TYPES, **common, manifest="") < self.count(manifest_text):
            manifest_text = "\n".join(f"{t} ({sum(r['count'] for r in rows[t])} resources, {len(rows[t])} codes)"
                                      for t in types)  # fmt: skip
            trace.append({"step": "select_types", "note": "the manifest's codes do not fit the context: types only"})
        select = prompts.SELECT_TYPES.format(**common, manifest=manifest_text)
        [chosen] = self.structured("select_types", [select], lambda r: parse_type_list(r, types), trace, ["types"])
        chosen = types if chosen is None else chosen

        # 2. one retrieval call per type
        calls = self.tool_calls(patient_id, question, chosen, rows, trace)
        fetched: dict[str, Any] = {}
        for rtype, args in zip(chosen, calls):
            if args == "skip":
                trace.append({"step": "tool_call", "label": rtype, "note": "the model skipped this type"})
                continue
            result = self.tools.call(RESOURCE_TOOL, args)
            trace.append(_tool_entry(result))
            if result.refs:
                fetched[rtype] = result

        # 3. per-type summaries
        summaries = self.summarize(patient_id, question, fetched, trace)
        evidence = [ref for result in fetched.values() for ref in result.refs]

        # 4. the answer, with the demographics (age, sex) that questions often turn on
        demographics = self.tools.call("get_patient_demographics", {"patient_id": patient_id})
        trace.append(_tool_entry(demographics))
        evidence += demographics.refs
        answer_prompt = self.answer_prompt(patient_id, question, summaries, answer_format, trace, demographics.text)
        [reply] = self.generate([answer_prompt])
        trace.append({"step": "answer", "prompt_tokens": self.count(answer_prompt), "reply": reply})
        answer = answer_text(reply)
        known = set(evidence)
        cited = citations(answer)
        return NavigatorResult(
            patient_id=patient_id, question=question, answer=answer,
            citations=[c for c in cited if c in known], unverified_citations=[c for c in cited if c not in known],
            evidence=evidence, summaries=summaries, trace=trace,
        )  # fmt: skip

    def tool_calls(self, patient_id: str, question: str, chosen: list[str], rows: dict, trace: list) -> list:
        """Per chosen type: the arguments of its retrieval call, or "skip"."""
        prompt_list = []
        for rtype in chosen:
            fields = {"patient_id": patient_id, "question": question, "fhir_resource": rtype}
            suffix = prompts.TOOL_CALL_NATIVE_SUFFIX if self.use_tools else prompts.TOOL_CALL_JSON_SUFFIX
            template = prompts.TOOL_CALL + suffix
            codes = [f"{r['code']} {r['display']} [{r['system']}] x{r['count']} {r['first']}..{r['last']}"
                     for r in rows[rtype]]  # fmt: skip
            room = self.room(template, **fields, codes="")
            kept, used = [], 0
            for line in codes:
                used += self.count(line) + 1
                if used > room - 32:
                    left_out = len(codes) - len(kept)
                    kept.append(f"... and {left_out} more codes (leave filter_code empty to get all)")
                    trace.append({"step": "tool_call", "label": rtype, "note": f"{left_out} of {len(codes)} codes "
                                  "left out of the prompt (they do not fit the context)"})  # fmt: skip
                    break
                kept.append(line)
            prompt_list.append(template.format(**fields, codes="\n".join(kept)))
        if self.use_tools:
            parsed = self.native_tool_calls(prompt_list, chosen, trace)
            if parsed is None:  # the server refused tools: the same step with the JSON protocol
                return self.tool_calls(patient_id, question, chosen, rows, trace)
        else:
            parsed = self.structured("tool_call", prompt_list, lambda r: parse_tool_call(r, RESOURCE_TOOL) or "skip",
                                     trace, chosen)  # fmt: skip
        out = []
        for rtype, args in zip(chosen, parsed):
            if args == "skip":
                out.append("skip")
                continue
            args = dict(args or {})  # None (unparseable twice): the whole type, unfiltered
            if args.get("patient_id", patient_id) != patient_id or args.get("fhir_resource", rtype) != rtype:
                trace.append({"step": "tool_call", "label": rtype, "note": "the call named another patient or type; "
                              "corrected to this question's"})  # fmt: skip
            allowed = {"filter_code", "date_from", "date_to"}
            clean = {k: v for k, v in args.items() if k in allowed and isinstance(v, (str, list)) and v}
            out.append({"patient_id": patient_id, "fhir_resource": rtype, **clean})
        return out

    def summarize(self, patient_id: str, question: str, fetched: dict, trace: list) -> dict[str, str]:
        jobs: list[tuple[str, str]] = []  # (type, prompt)
        for rtype, result in fetched.items():
            fields = {"patient_id": patient_id, "question": question, "fhir_resource": rtype}
            room = self.room(prompts.SUMMARIZE, **fields, part=" (part 10 of 10)", resources="")
            parts = self.pack(result.text.split("\n"), room, trace, rtype)
            for n, part in enumerate(parts, 1):
                label = f" (part {n} of {len(parts)})" if len(parts) > 1 else ""
                jobs.append((rtype, prompts.SUMMARIZE.format(**fields, part=label, resources=part)))
        replies = self.generate([p for _, p in jobs])
        pieces: dict[str, list[str]] = {}
        for (rtype, prompt), reply in zip(jobs, replies):
            trace.append({"step": "summarize", "label": rtype, "prompt_tokens": self.count(prompt), "reply": reply})
            pieces.setdefault(rtype, []).append(answer_text(reply))
        return {rtype: self.merge(patient_id, question, rtype, texts, trace) for rtype, texts in pieces.items()}

    def merge(self, patient_id: str, question: str, label: str, texts: list[str], trace: list) -> str:
        """One summary from several (MERGE prompt), in as many rounds as the context needs."""
        rounds = 0
        while len(texts) > 1:
            fields = {"patient_id": patient_id, "question": question, "fhir_resource": label}
            room = self.room(prompts.MERGE, **fields, resources="")
            groups = self.pack(texts, room, trace, f"merge {label}")
            if len(groups) >= len(texts) and rounds:  # no progress: each summary alone fills the room
                return "\n".join(texts)
            merge_prompts = [prompts.MERGE.format(**fields, resources=g) for g in groups]
            texts = []
            for prompt, reply in zip(merge_prompts, self.generate(merge_prompts)):
                trace.append({"step": "merge", "label": label, "prompt_tokens": self.count(prompt), "reply": reply})
                texts.append(answer_text(reply))
            rounds += 1
        return texts[0] if texts else ""

    def answer_prompt(self, patient_id, question, summaries, answer_format, trace, demographics) -> str:
        fields = {"patient_id": patient_id, "question": question, "answer_format": answer_format,
                  "demographics": demographics}  # fmt: skip
        body = "\n\n".join(f"{rtype}:\n{text}" for rtype, text in summaries.items()) or "(no facts were retrieved)"
        if self.count(body) > self.room(prompts.ANSWER, **fields, summaries=""):
            trace.append({"step": "answer", "note": "the summaries do not fit the context together: merged"})
            body = self.merge(patient_id, question, "record", [f"{t}:\n{s}" for t, s in summaries.items()], trace)
            if self.count(body) > self.room(prompts.ANSWER, **fields, summaries=""):
                trace.append({"step": "answer", "note": "merging could not shorten the facts to fit the context; "
                              "the answer prompt is over the context"})  # fmt: skip
        return prompts.ANSWER.format(**fields, summaries=body)


def _native_arguments(reply: dict):
    """The arguments of the first `get_patient_fhir_resource` call of an OpenAI assistant message, "skip" for
    none (a reply of `{}` or nothing), or the call written in the text (JSON / Python-style)."""
    for call in reply.get("tool_calls") or []:
        function = call.get("function") or {}
        if function.get("name") == RESOURCE_TOOL:
            try:
                args = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                raise ReplyError("the tool call's arguments are not JSON") from None
            if not isinstance(args, dict):
                raise ReplyError("the tool call's arguments are not a JSON object")
            return args
    return parse_tool_call(reply.get("content") or "{}", RESOURCE_TOOL) or "skip"


def _tool_entry(result) -> dict:
    entry = {"step": "tool", "name": result.name, "arguments": result.arguments, "resources": len(result.refs),
             "chars": len(result.text)}  # fmt: skip
    if result.error:
        entry["error"] = result.error
    return entry
