"""Reading the navigator's structured replies robustly.

A reply may carry a thinking block (`<unused94>thought ... <unused95>`, removed first), code fences
(```json ... ```), prose around the JSON, or a Python-style call list (`[get_patient_fhir_resource(a="x")]`,
Gemma 3's function-calling habit). The first JSON value that reads, after the thinking block, is taken.
Failures raise `ReplyError` with a short reason the agent sends back to the model when it retries.
"""

from __future__ import annotations

import ast
import json
import re

from openmedgemma.tokenizer.thinking import split_thinking

CITATION = re.compile(r"\[?\b([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})\b\]?")
_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.S)


class ReplyError(ValueError):
    """The reply does not hold what the step asked for; the message says why (it is shown to the model)."""


def answer_text(reply: str) -> str:
    """The reply without its thinking block (an unfinished block leaves nothing)."""
    return split_thinking(reply)[1]


def first_json(reply: str):
    """The first JSON value (object or list) in the reply, fences and thinking removed."""
    text = answer_text(reply)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, char in enumerate(candidate):
            if char in "[{":
                try:
                    return decoder.raw_decode(candidate[start:])[0]
                except json.JSONDecodeError:
                    continue
    raise ReplyError("no JSON value found in the reply")


def parse_type_list(reply: str, allowed: list[str]) -> list[str]:
    """A JSON list of resource types (or {"types": [...]}); types outside `allowed` are an error."""
    value = first_json(reply)
    if isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, list)), None)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReplyError("expected a JSON list of resource type names")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ReplyError(f"{unknown} are not resource types of this record ({', '.join(allowed)})")
    return list(dict.fromkeys(value))


def parse_tool_call(reply: str, name: str) -> dict | None:
    """The arguments of one call to `name` (JSON {"name", "arguments"}, or a Python-style call); None for `{}`."""
    text = answer_text(reply)
    call = _python_call(text, name)
    if call is not None:
        return call
    value = first_json(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value == {} or value == []:
        return None
    if not isinstance(value, dict):
        raise ReplyError("expected one JSON object with name and arguments, or {}")
    if "function" in value and isinstance(value["function"], dict):  # an OpenAI-style tool call pasted as text
        value = value["function"]
    args = value.get("arguments", value.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ReplyError("the call's arguments are not a JSON object") from None
    if value.get("name") != name or not isinstance(args, dict):
        raise ReplyError(f'expected {{"name": "{name}", "arguments": {{...}}}} or {{}}')
    return args


def _python_call(text: str, name: str) -> dict | None:
    match = re.search(r"\[?\s*" + re.escape(name) + r"\s*\(", text)
    if not match:
        return None
    snippet = text[match.start() :].lstrip("[ \t\n")
    depth = 0
    for end, char in enumerate(snippet):
        depth += char == "("
        depth -= char == ")"
        if char == ")" and depth == 0:
            break
    else:
        raise ReplyError(f"the call to {name} is not closed")
    try:
        node = ast.parse(snippet[: end + 1], mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        raise ReplyError(f"the call to {name} is not a call with keyword arguments") from None


def citations(text: str, known: set[str] | None = None) -> list[str]:
    """`Type/id` references in the text, in order, once each (only those in `known` when it is given)."""
    found = [f"{m.group(1)}/{m.group(2)}" for m in CITATION.finditer(answer_text(text))]
    found = [f for f in dict.fromkeys(found) if known is None or f in known]
    return found
