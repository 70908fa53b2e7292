"""Turning real model output into answers.

Rules (all answers go through `strip_thinking` first):

- Thinking: complete ``<unused94> ... <unused95>`` blocks are removed; an unclosed ``<unused94>``
  removes everything after it (the model ran out of tokens while thinking: no answer).
- "Final Answer": the **last** occurrence wins (case-insensitive, markdown such as
  ``**Final Answer:** B`` allowed). When it is present only the line after it is read; if no
  answer can be read there the output is unparseable (we do not go looking elsewhere).
- Multiple choice: inside the final-answer line, in order: a bare letter; a letter in
  parentheses (two different ones = ambiguous = unparseable); a leading letter such as ``B.`` or
  ``B) text``; the text of an option; any standalone capital letter (``A``/``I`` followed by a
  lower-case word are read as English words). Without a final-answer line: a bare letter, a
  leading letter, ``answer is (X)`` / ``answer: X`` (last one), the only letter in parentheses,
  the full text of one option, or the one option whose full text the last sentence names
  ("The answer is Acute angle-closure glaucoma."; an option named only inside a longer named option
  does not count; two named options, or a negation before the option, stay unparseable).
- Yes/no: the first word of the final-answer line (or of the whole answer) must be yes or no.
- Unparseable answers return None; tasks count them as wrong and report how many there were.
"""

from __future__ import annotations

import re
import string

THINK_OPEN = "<unused94>"
THINK_CLOSE = "<unused95>"

_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.S)
_FINAL = re.compile(r"final\s+answer", re.I)
_FINAL_LEAD = " \t\r\n*_:：-=>#`"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_PAREN_LETTER = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
_LEADING_LETTER = re.compile(r"^[\s*_`#\"'(\[]*([A-Z])(?:\s*[.):\]]|\s*$|\s+(?=[^a-z\s]))")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’\-])([A-Z])(?![A-Za-z0-9'’\-])")
_ANSWER_IS = re.compile(
    r"(?i:answer\s*(?:is\s*:?|:)\s*(?:option\s*)?)[*_]*\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z0-9]))"
)
_PUNCT = re.compile("[" + re.escape(string.punctuation + "“”‘’") + "]")


def strip_thinking(text: str) -> str:
    """Drop ``<unused94>thought ... <unused95>`` blocks (and an unclosed trailing one)."""
    text = _THINK_BLOCK.sub("", text)
    if THINK_CLOSE in text:  # a closing marker without its opening: the answer follows it
        text = text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:  # thinking never finished: whatever follows is not an answer
        text = text.split(THINK_OPEN, 1)[0]
    return text.strip()


def final_answer_line(text: str) -> str | None:
    """The text on the line after the last "Final Answer", or None if there is none."""
    matches = list(_FINAL.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    rest = re.sub(r"^\s*(?:[*_]{1,2})?\s*(?:is\b)?", "", rest, flags=re.I)
    rest = rest.lstrip(_FINAL_LEAD)
    return rest.split("\n", 1)[0].strip()


def _bare(text: str) -> str:
    """Text without punctuation, markdown and surrounding space."""
    return _PUNCT.sub(" ", text).strip()


def _norm_option(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _letter_from_option_text(text: str, options: dict[str, str], *, whole_only: bool) -> str | None:
    said = _norm_option(text)
    if not said:
        return None
    normed = {k: _norm_option(v) for k, v in options.items()}
    exact = [k for k, v in normed.items() if v and v == said]
    if len(exact) == 1:
        return exact[0]
    if whole_only:
        return None
    prefix = [k for k, v in normed.items() if v and said.startswith(v + " ")]
    if prefix:
        return max(prefix, key=lambda k: len(normed[k]))
    inside = [k for k, v in normed.items() if v and re.search(r"\b" + re.escape(v) + r"\b", said)]
    return inside[0] if len(inside) == 1 else None


def _single_letter(text: str, letters: set[str]) -> str | None:
    bare = _bare(text)
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    return None


def _choice_from_final_line(line: str, options: dict[str, str]) -> str | None:
    letters = set(options)
    boxed = _BOXED.search(line)
    if boxed:
        line = boxed.group(1)
    found = _single_letter(line, letters)
    if found:
        return found
    in_parens = {m.upper() for m in _PAREN_LETTER.findall(line) if m.upper() in letters}
    if len(in_parens) == 1:
        return in_parens.pop()
    if len(in_parens) > 1:
        return None
    lead = _LEADING_LETTER.match(line)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    by_text = _letter_from_option_text(line, options, whole_only=False)
    if by_text:
        return by_text
    for m in _STANDALONE.finditer(line):
        letter = m.group(1)
        if letter not in letters:
            continue
        if letter in "AI" and re.match(r"\s+[a-z]", line[m.end() :]):
            continue
        return letter
    return None


def _choice_without_final_line(body: str, options: dict[str, str]) -> str | None:
    letters = set(options)
    found = _single_letter(body, letters)
    if found:
        return found
    first_line = body.split("\n", 1)[0]
    lead = _LEADING_LETTER.match(first_line)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    stated = [(a or b).upper() for a, b in _ANSWER_IS.findall(body) if (a or b).upper() in letters]
    if stated:
        return stated[-1]
    in_parens = {m.upper() for m in _PAREN_LETTER.findall(body) if m.upper() in letters}
    if len(in_parens) == 1:
        return in_parens.pop()
    return _letter_from_option_text(body, options, whole_only=True) or _option_in_last_sentence(body, options)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|unlikely|excluded?|rule[sd]? out)\b|n't\b")


def _option_in_last_sentence(body: str, options: dict[str, str]) -> str | None:
    """The one option whose full text the last sentence names (models often end "The answer is <text>.")."""
    sentences = [s for s in _SENTENCE_END.split(body) if _norm_option(s)]
    if not sentences:
        return None
    said = _norm_option(sentences[-1])
    spans = {}
    for letter, text in options.items():
        norm = _norm_option(text)
        if norm:
            found = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(norm) + r"(?!\w)", said)]
            if found:
                spans[letter] = found

    def inside_longer(letter: str) -> bool:  # "glaucoma" named only as part of "angle-closure glaucoma"
        return all(any(a <= s and e <= b and (a, b) != (s, e) for other, o in spans.items() if other != letter
                       for a, b in o) for s, e in spans[letter])  # fmt: skip

    named = [letter for letter in spans if not inside_longer(letter)]
    if len(named) != 1 or _NEGATION.search(said[: spans[named[0]][0][0]]):
        return None
    return named[0]


def parse_choice(output: str, options: dict[str, str]) -> str | None:
    """The option letter a model chose, or None when it cannot be read unambiguously.

    `options` maps letters ("A", "B", ...) to option texts.
    """
    body = strip_thinking(output)
    line = final_answer_line(body)
    if line is not None:
        return _choice_from_final_line(line, options)
    return _choice_without_final_line(body, options)


def parse_yes_no(output: str) -> str | None:
    """ "yes" or "no" from the first word of the final-answer line (or of the whole answer)."""
    body = strip_thinking(output)
    line = final_answer_line(body)
    words = _norm_option(line if line is not None else body).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    return None


def free_text_answer(output: str) -> str:
    """A short free-text answer: the final-answer line if there is one, else the whole answer."""
    body = strip_thinking(output)
    line = final_answer_line(body)
    return line if line is not None else body
