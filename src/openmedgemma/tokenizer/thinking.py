"""Thinking output of MedGemma 27B / 1.5: `<unused94>thought\\n{thought}<unused95>{answer}`.

`split_thinking` works on decoded text. The markers are ordinary (non-special) tokens in the official
vocabulary, so they survive `decode(..., skip_special_tokens=True)`; with special tokens kept, the text may
also end with `<end_of_turn>` / `<eos>`, which are dropped. `Tokenizer.decode_thinking` splits on the
marker ids instead, so it works whatever a tokenizer file marks as special.
"""

from __future__ import annotations

THOUGHT_START = "<unused94>"
THOUGHT_END = "<unused95>"
THOUGHT_LABEL = "thought"  # the model writes this word (then a newline) right after THOUGHT_START
STOP_STRINGS = ("<end_of_turn>", "<eos>")


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thought, answer) from generated text.

    - no thinking block: (None, text), the text as it is;
    - `<unused94>thought\\n T <unused95> A`: (T, A);
    - a block never closed (generation cut off): (everything after the opening marker, "");
    - a closing marker without an opening one (the opener was in the prompt, or skipped as special):
      (the text before it, the text after it).
    With a block, the thought loses the "thought" label and both parts are stripped of surrounding
    whitespace; the answer is all the text outside the block. Trailing `<end_of_turn>` / `<eos>`
    (decoding with special tokens kept) are removed first.
    """
    text = _strip_stops(text)
    start = text.find(THOUGHT_START)
    if start < 0:
        end = text.find(THOUGHT_END)
        if end < 0:
            return None, text
        return _clean_thought(text[:end]), text[end + len(THOUGHT_END):].strip()
    before, rest = text[:start], text[start + len(THOUGHT_START):]
    end = rest.find(THOUGHT_END)
    if end < 0:
        return _clean_thought(rest), before.strip()
    return _clean_thought(rest[:end]), (before + rest[end + len(THOUGHT_END):]).strip()


def _clean_thought(thought: str) -> str:
    label, rest = thought[: len(THOUGHT_LABEL)], thought[len(THOUGHT_LABEL):]
    if label == THOUGHT_LABEL and (not rest or rest[0].isspace()):
        thought = rest
    return thought.strip()


def _strip_stops(text: str) -> str:
    while True:
        stripped = text.rstrip()
        for stop in STOP_STRINGS:
            if stripped.endswith(stop):
                text = stripped[: -len(stop)]
                break
        else:
            return text
