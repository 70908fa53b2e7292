"""OpenAI `tools` <-> Gemma function calling. Gemma has no tool tokens, so tools are a prompt.

Format (the Gemma function-calling guide's JSON style):
- The tool definitions go into the first user turn (after any system text), as the guide does:
  an instruction and the OpenAI `function` objects as JSON.
- A call the model makes is a fenced block::

      ```tool_code
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      ```

  (a JSON list of such objects for parallel calls; "parameters" is read as "arguments"; a bare JSON
  object or list naming a known tool is accepted too, as is Gemma's pythonic `[f(a=1)]` style).
- Earlier assistant tool calls are rendered back in that form, and `role: "tool"` results as a user
  turn holding ```tool_output blocks, so a conversation round-trips.
`tool_choice`: "none" (tools not shown, nothing parsed), "auto" (default), "required" or
{"type": "function", "function": {"name": ...}} (the instruction says the call is required; a small
model may still answer in text, which is then returned as content).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from openmedgemma.errors import OpenMedGemmaError

_FENCE = re.compile(r"```(?:tool_code|tool_call|json)?\s*\n?(.*?)```", re.DOTALL)


class ToolError(OpenMedGemmaError):
    """`tools` / `tool_choice` / tool messages that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_tools(tools: list[dict] | None, tool_choice) -> tuple[list[dict], str | None]:
    """The function definitions and the forced function name (or "required" / None); ToolError if malformed."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise ToolError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}", f"tools[{i}]")
        functions.append(fn)
    if tool_choice in (None, "auto", "none"):
        return (functions if tool_choice != "none" else []), None
    if not functions:
        raise ToolError("tool_choice needs tools", "tool_choice")
    if tool_choice == "required":
        return functions, "required"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in {f["name"] for f in functions}:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return functions, name


def instruction(functions: list[dict], forced: str | None) -> str:
    must = ""
    if forced == "required":
        must = "You MUST call at least one function.\n"
    elif forced:
        must = f"You MUST call the function {forced}.\n"
    return (
        "You have access to the functions below. To call one, reply with only a ```tool_code block holding "
        'a JSON object {"name": <function name>, "arguments": <object of argument values>} (or a JSON list of '
        "such objects to call several); otherwise answer normally.\n" + must
        + "Functions:\n" + json.dumps(functions, ensure_ascii=False, indent=1) + "\n"
    )


def render_messages(messages: list[dict], functions: list[dict], forced: str | None) -> list[dict]:
    """OpenAI messages (with tool calls and tool results) -> the user/assistant turns Gemma's template takes."""
    out: list[dict] = []

    def add(role: str, parts: list[dict]) -> None:
        if out and out[-1]["role"] == role and role != "system":
            out[-1]["content"] = out[-1]["content"] + [{"type": "text", "text": "\n"}] + parts
        else:
            out.append({"role": role, "content": parts})

    for m in messages:
        role, content = m["role"], m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments") or "{}")}
                     for c in m["tool_calls"]]  # fmt: skip
            parts = parts + [{"type": "text", "text": "```tool_code\n" + json.dumps(calls if len(calls) > 1 else calls[0])
                                                      + "\n```"}]  # fmt: skip
        if role == "tool":
            text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
            role, parts = "user", [{"type": "text", "text": f"```tool_output\n{text}\n```"}]
        add(role, parts)
    if functions:
        first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first_user is not None:
            out[first_user]["content"] = [{"type": "text", "text": instruction(functions, forced)}] + out[first_user][
                "content"]  # fmt: skip
    return out


def parse_tool_calls(text: str, functions: list[dict]) -> tuple[str | None, list[dict]]:
    """(the text left as content or None, OpenAI tool_calls) from the model's answer."""
    names = {f["name"] for f in functions}
    if not names:
        return text, []
    calls, spans = [], []
    for match in _FENCE.finditer(text):
        found = _calls_in(match.group(1), names)
        if found:
            calls += found
            spans.append(match.span())
    if not calls:
        found = _calls_in(text.strip(), names)
        if found:
            calls, spans = found, [(0, len(text))]
    if not calls:
        return text, []
    rest = text
    for start, end in reversed(spans):
        rest = rest[:start] + rest[end:]
    rest = rest.strip()
    out = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
           for name, args in calls]  # fmt: skip
    return (rest or None), out


def _calls_in(block: str, names: set[str]) -> list[tuple[str, dict]]:
    block = block.strip()
    try:
        value = json.loads(block)
    except ValueError:
        return _pythonic(block, names)
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = _loads(args)
        if not isinstance(args, dict):
            return []
        calls.append((item["name"], args))
    return calls


def _pythonic(block: str, names: set[str]) -> list[tuple[str, dict]]:
    """Gemma's `[f(a=1, b="x"), g()]` style."""
    try:
        tree = ast.parse(block, mode="eval").body
    except SyntaxError:
        return []
    items = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for item in items:
        if not (isinstance(item, ast.Call) and isinstance(item.func, ast.Name) and item.func.id in names) or item.args:
            return []
        try:
            calls.append((item.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in item.keywords}))
        except ValueError:
            return []
    return calls


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"_raw": text}
