"""EHRQA: questions about a patient's FHIR record (MedGemma report §5.2), generated from Synthea bundles.

Data: `<data_dir>/synthea_fhir_r4/` (or `records=` bundles / an index file). Questions come from
`openmedgemma.ehr.questions` (seeded by `question_seed`, `per_category` per category per patient), or from a
reviewed JSONL file (`questions=`); `write_questions=PATH` saves the generated set.

Two modes (`context=`):
- `record`: the condensed record (tools.record_text: demographics, then one line per resource) and the
  question in one prompt, as the report evaluated; patients whose record is estimated over
  `max_record_tokens` (2.5 characters per token) are left out, as the report kept records under 32k tokens.
- `agent`: the EHR navigator (`openmedgemma.ehr.agent`) answers through the record tools; its citations and
  trace are kept in predictions.jsonl. `agent_context_tokens` is the context it fits prompts to when the model
  does not state its own (an endpoint; the in-process engine does).

Scoring ("Final Answer:" line when there is one, else the whole answer): yes/no by the first word;
multiple choice by `parse_choice`; dates in ISO, US (MM/DD/YYYY) or month-name forms compared as dates;
numbers within 1% (relative) of the truth, the unit not required; names when the given and family names of
the truth all appear (titles and punctuation ignored). Accuracy is averaged over categories (the report's
figure; bootstrap over questions), with per-category accuracy, the micro average and majority baselines.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from openmedgemma.errors import ConfigError, DataError

from ..metrics import bootstrap_ci, estimate, mean_estimate
from ..parsing import final_answer_line, parse_choice, parse_yes_no, strip_thinking
from .base import ChatTask, Example, register

CHARS_PER_TOKEN = 2.5
FORMATS = {
    "yes_no": 'Answer yes or no. End your reply with "Final Answer: yes" or "Final Answer: no".',
    "choice": 'End your reply with "Final Answer: X", where X is the letter of your choice.',
    "date": 'End your reply with "Final Answer: " followed by the date as YYYY-MM-DD.',
    "number": 'End your reply with "Final Answer: " followed by the value and its unit.',
    "name": 'End your reply with "Final Answer: " followed by the full name.',
}
RECORD_PROMPT = """Here is the FHIR record of a patient, condensed: the patient's demographics, then each resource type with one resource per line, starting with its reference.

{record}

Question: {question}
{answer_format}"""
_MONTHS = {m: i for i, m in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november",
     "december"], 1)}  # fmt: skip
_ISO = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})")
_US = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_MONTH_FIRST = re.compile(r"\b([A-Za-z]+)\.? (\d{1,2})(?:st|nd|rd|th)?,? (\d{4})\b")
_DAY_FIRST = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)? ([A-Za-z]+),? (\d{4})\b")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def _answer_span(output: str) -> str:
    text = strip_thinking(output)
    line = final_answer_line(text)
    return line if line is not None else text


def parse_date(text: str) -> date | None:
    """The first date written as YYYY-MM-DD, MM/DD/YYYY, 'March 5, 2017' or '5 March 2017'."""
    found = []
    for pattern, order in ((_ISO, "ymd"), (_US, "mdy"), (_MONTH_FIRST, "Mdy"), (_DAY_FIRST, "dMy")):
        for m in pattern.finditer(text):
            parts = dict(zip(order, m.groups()))
            month = _MONTHS.get(parts["M"].lower()) if "M" in parts else int(parts["m"])
            try:
                found.append((m.start(), date(int(parts["y"]), month or 0, int(parts["d"]))))
            except (ValueError, TypeError):
                continue
    return min(found)[1] if found else None


def parse_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group().replace(",", "")) if m else None


def _name_tokens(text: str) -> list[str]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return [w for w in words if w not in ("dr", "mr", "mrs", "ms", "miss") and not w.isdigit()]


def is_correct(answer_type: str, gold: str, output: str, options: dict[str, str]) -> tuple[bool, str | None]:
    """(correct, what was read from the output); what was read is None when nothing could be."""
    if answer_type == "choice":
        parsed = parse_choice(output, options)
        return parsed == gold, parsed
    if answer_type == "yes_no":
        parsed = parse_yes_no(output)
        return parsed == gold, parsed
    span = _answer_span(output)
    if answer_type == "date":
        parsed = parse_date(span)
        return parsed is not None and parsed.isoformat() == gold, parsed and parsed.isoformat()
    if answer_type == "number":
        value, truth = parse_number(span), float(gold)
        ok = value is not None and abs(value - truth) <= max(0.01 * abs(truth), 1e-9)
        return ok, None if value is None else f"{value:g}"
    if answer_type == "name":
        tokens = set(_name_tokens(span))
        return bool(tokens) and all(t in tokens for t in _name_tokens(gold)), span or None
    raise DataError(f"unknown answer type {answer_type!r}")


@register
class EHRQA(ChatTask):
    name = "ehrqa"
    description = "questions on Synthea FHIR records, 9 categories (record in the prompt, or the EHR navigator)"
    option_defaults = {"context": "record", "per_category": 2, "question_seed": 0, "questions": "",
                       "write_questions": "", "records": "", "max_record_tokens": 32000,
                       "agent_context_tokens": 8192}  # fmt: skip
    path_options = ("questions", "records")
    hidden_options = ("write_questions",)
    max_new_tokens = 512

    def __init__(self, data_dir, **options):
        super().__init__(data_dir, **options)
        if self.options["context"] not in ("record", "agent"):
            raise ConfigError(f"task ehrqa: context must be record or agent, got {self.options['context']!r}")
        self._store = None
        self._questions: dict[str, object] = {}

    @property
    def store(self):
        if self._store is None:
            from openmedgemma.ehr.store import open_store

            records = self.options["records"] or self.data_dir / "synthea_fhir_r4"
            if not self.options["records"] and not Path(records).is_dir():
                raise DataError(f"{records}: no Synthea FHIR folder (pass --task-option records=BUNDLES_OR_INDEX)")
            self._store = open_store(records)
        return self._store

    def questions(self) -> list:
        from openmedgemma.ehr.questions import generate_questions, read_questions, write_questions

        if self.options["questions"]:
            found = read_questions(self.options["questions"])
        else:
            found = generate_questions(self.store, seed=self.options["question_seed"],
                                       per_category=self.options["per_category"])  # fmt: skip
        if self.options["write_questions"]:
            write_questions(found, self.options["write_questions"])
        return found

    def load_examples(self) -> list[Example]:
        from openmedgemma.ehr.tools import Tools, record_text

        questions = self.questions()
        tools, records, skipped = Tools(self.store), {}, set()
        examples = []
        for q in questions:
            self._questions[q.id] = q
            options = "".join(f"\n{letter}. {text}" for letter, text in q.options.items())
            answer_format = FORMATS[q.answer_type]
            if self.options["context"] == "agent":
                content = f"Patient {q.patient_id}: {q.question}{options}\n{answer_format}"
            else:
                if q.patient_id not in records:
                    records[q.patient_id] = record_text(tools, q.patient_id)[0]
                record = records[q.patient_id]
                if len(record) / CHARS_PER_TOKEN > self.options["max_record_tokens"]:
                    skipped.add(q.patient_id)
                    continue
                content = RECORD_PROMPT.format(record=record, question=q.question + options,
                                               answer_format=answer_format)  # fmt: skip
            meta = {"category": q.category, "format": q.format, "answer_type": q.answer_type, "options": q.options,
                    "patient_id": q.patient_id, "question": q.question + options,
                    "answer_format": answer_format}  # fmt: skip
            examples.append(Example(q.id, [{"role": "user", "content": content}], q.answer, meta))
        if not examples:
            raise DataError(f"ehrqa: no question left (records over max_record_tokens: {len(skipped)} patients)")
        self.data_info = {"questions": len(examples), "patients": len({e.meta["patient_id"] for e in examples}),
                          "patients_over_max_record_tokens": len(skipped),
                          "records": str(self.store.source)}  # fmt: skip
        return examples

    def generate(self, model, examples, *, max_new_tokens: int, seed: int) -> list:
        if self.options["context"] == "record":
            return super().generate(model, examples, max_new_tokens=max_new_tokens, seed=seed)
        from openmedgemma.ehr.agent import Navigator

        navigator = Navigator(model, self.store, max_new_tokens=max_new_tokens, seed=seed,
                              context_tokens=self.options["agent_context_tokens"])  # fmt: skip
        out = []
        for ex in examples:
            result = navigator.ask(ex.meta["patient_id"], ex.meta["question"],
                                   answer_format="\n" + ex.meta["answer_format"])  # fmt: skip
            out.append({"output": result.answer, "citations": result.citations,
                        "unverified_citations": result.unverified_citations, "trace": result.trace})  # fmt: skip
        return out

    def score(self, examples, outputs, *, n_boot: int, seed: int) -> dict:
        rows = [is_correct(ex.meta["answer_type"], ex.target, out, ex.meta["options"])
                for ex, out in zip(examples, outputs)]  # fmt: skip
        correct = np.array([ok for ok, _ in rows], dtype=float)
        categories = sorted({ex.meta["category"] for ex in examples})
        masks = {c: np.array([ex.meta["category"] == c for ex in examples]) for c in categories}
        by_category = {c: mean_estimate(correct[m], n_boot=n_boot, seed=seed) for c, m in masks.items()}
        cat_index = np.array([categories.index(ex.meta["category"]) for ex in examples])

        def macro(idx):
            cats = cat_index[idx]
            values = [correct[idx][cats == k].mean() for k in range(len(categories)) if (cats == k).any()]
            return float(np.mean(values)) if values else None

        low, high, _ = bootstrap_ci(macro, len(examples), n_boot=n_boot, seed=seed)
        formats = sorted({ex.meta["format"] for ex in examples})
        by_format = {f: mean_estimate(correct[[ex.meta["format"] == f for ex in examples]], n_boot=n_boot, seed=seed)
                     for f in formats}  # fmt: skip
        unparseable = [ex.id for ex, (_, parsed) in zip(examples, rows) if parsed is None]
        return {
            "metrics": {
                "accuracy": estimate(macro(np.arange(len(examples))), (low, high), len(examples),
                                     averaged_over="categories"),  # fmt: skip
                "accuracy_micro": mean_estimate(correct, n_boot=n_boot, seed=seed),
            },
            "breakdown": {"by_category": by_category, "by_format": by_format},
            "counts": {"n": len(examples), "correct": int(correct.sum()), "unparseable": len(unparseable),
                       "unparseable_ids": unparseable[:20],
                       "per_category": {c: int(m.sum()) for c, m in masks.items()}},  # fmt: skip
            "per_example": [
                {"id": ex.id, "category": ex.meta["category"], "gold": ex.target, "parsed": parsed, "correct": bool(ok)}
                for ex, (ok, parsed) in zip(examples, rows)
            ],
        }

    def baseline_outputs(self, examples) -> dict[str, list[str]]:
        """The most common gold answer of each category, given to every question of the category."""
        majority = {}
        for category in {ex.meta["category"] for ex in examples}:
            golds = Counter(ex.target for ex in examples if ex.meta["category"] == category)
            majority[category] = sorted(golds.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        return {"majority per category": [f"Final Answer: {majority[ex.meta['category']]}" for ex in examples]}

    def notes(self) -> list[str]:
        return [
            "questions generated from the records (openmedgemma.ehr.questions): 9 of the report's 10 categories; "
            "class-level condition questions need the SNOMED hierarchy and are not generated",
            f"context={self.options['context']}: "
            + ("the condensed record in the prompt" if self.options["context"] == "record"
               else "the EHR navigator agent"),
            "accuracy is the mean of the per-category accuracies (as the report); CI by bootstrap over questions",
        ]
