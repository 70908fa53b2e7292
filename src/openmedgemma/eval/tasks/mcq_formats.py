"""Readers for multiple-choice question files in their published formats.

- "standard" JSONL (MedAgentsBench / MedQA style): {realidx, question, options{A..}, answer_idx}.
- PubMedQA PQA-L original: ori_pqal.json + test_ground_truth.json (500 test ids).
- PubMedQA JSONL (MedAgentsBench): the question field is the contexts joined by newlines followed
  by the question on the last line; it is split back into context and question.
- MMLU CSV: <subject>_test.csv, either with the header "question,choice0..3,answer" and a 0-3
  index (the copy in data/mmlu_medical_csv) or the original headerless form with a letter.
- Generic: any JSONL/CSV whose fields are named by configuration (AfriMed-QA, MedBullets, ...).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from openmedgemma.errors import DataError

from .files import read_csv, read_json, read_jsonl, require_columns

LETTERS = string.ascii_uppercase


@dataclass
class McqItem:
    id: str
    question: str
    options: dict[str, str]
    answer: str
    context: str | None = None
    subject: str | None = None


def _checked(item: McqItem, where: str) -> McqItem:
    if len(item.options) < 2:
        raise DataError(f"{where}: fewer than two options")
    if item.answer not in item.options:
        raise DataError(f"{where}: answer {item.answer!r} is not one of the options {list(item.options)}")
    if not str(item.question).strip():
        raise DataError(f"{where}: empty question")
    return item


def read_standard_jsonl(path: Path, *, subject: str | None = None) -> list[McqItem]:
    items = []
    for number, row in enumerate(read_jsonl(path), 1):
        require_columns(path, row, ["question", "options", "answer_idx"])
        if not isinstance(row["options"], dict):
            raise DataError(f"{path}: line {number}: 'options' must be an object of letter -> text")
        options = {str(k).strip().upper(): str(v) for k, v in row["options"].items()}
        item = McqItem(
            id=str(row.get("realidx", number)),
            question=str(row["question"]),
            options=options,
            answer=str(row["answer_idx"]).strip().upper(),
            subject=row.get("subject", subject),
        )
        items.append(_checked(item, f"{path}: line {number}"))
    return unique_ids(items, path)


def unique_ids(items: list[McqItem], path: Path | str) -> list[McqItem]:
    seen = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: id {item.id!r} appears more than once")
        seen.add(item.id)
    return items


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_PUBMEDQA_LETTER = {v: k for k, v in PUBMEDQA_OPTIONS.items()}


def read_pubmedqa_original(pqal_path: Path, truth_path: Path) -> list[McqItem]:
    """The 500 test questions of PQA-L; context = the CONTEXTS paragraphs joined by newlines."""
    pqal, truth = read_json(pqal_path), read_json(truth_path)
    if not isinstance(pqal, dict) or not isinstance(truth, dict):
        raise DataError(f"{pqal_path} / {truth_path}: expected JSON objects keyed by PMID")
    items = []
    for pmid, decision in truth.items():
        if pmid not in pqal:
            raise DataError(f"{truth_path}: test id {pmid} is not in {pqal_path}")
        entry = pqal[pmid]
        require_columns(pqal_path, entry, ["QUESTION", "CONTEXTS"])
        if decision not in _PUBMEDQA_LETTER:
            raise DataError(f"{truth_path}: id {pmid}: answer {decision!r} is not yes/no/maybe")
        items.append(
            McqItem(
                id=str(pmid),
                question=entry["QUESTION"],
                options=dict(PUBMEDQA_OPTIONS),
                answer=_PUBMEDQA_LETTER[decision],
                context="\n".join(entry["CONTEXTS"]),
            )
        )
    return items


def read_pubmedqa_jsonl(path: Path) -> list[McqItem]:
    items = read_standard_jsonl(path)
    for item in items:
        if "\n" not in item.question:
            raise DataError(f"{path}: id {item.id}: expected the contexts and the question on separate lines")
        item.context, item.question = item.question.rsplit("\n", 1)
    return items


def read_mmlu_csv(path: Path, subject: str) -> list[McqItem]:
    """One MMLU subject CSV, with or without the header row."""
    rows = read_csv(path, header=False)
    header = [c.strip().lower() for c in rows[0]]
    indexed = header[:1] == ["question"] and header[-1:] == ["answer"]
    rows = rows[1:] if indexed else rows
    items = []
    for number, row in enumerate(rows, 2 if indexed else 1):
        if len(row) < 4:
            raise DataError(
                f"{path}: row {number} has {len(row)} columns, expected question, choices, answer"
            )
        question, choices, answer = row[0], row[1:-1], row[-1].strip()
        options = {LETTERS[i]: c for i, c in enumerate(choices)}
        if indexed:
            if not answer.isdigit() or int(answer) >= len(choices):
                raise DataError(
                    f"{path}: row {number}: answer {answer!r} is not an index 0-{len(choices) - 1}"
                )
            letter = LETTERS[int(answer)]
        else:
            letter = answer.upper()
        item = McqItem(
            f"{subject}-{number - (2 if indexed else 1)}", question, options, letter, subject=subject
        )
        items.append(_checked(item, f"{path}: row {number}"))
    return items


def read_mmlu_csv_dir(folder: Path, subjects: tuple[str, ...] = ()) -> list[McqItem]:
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise DataError(f"{folder}: no <subject>_test.csv files")
    items = []
    for path in files:
        subject = path.name[: -len("_test.csv")]
        if not subjects or subject in subjects:
            items.extend(read_mmlu_csv(path, subject))
    return items


ANSWER_FORMATS = ("letter", "index0", "index1", "key", "text")


@dataclass
class GenericFields:
    """Field names of a generic MCQ file. Either `options_field` (an object, a JSON string of an
    object, or a list) or `option_fields` (one column per option) gives the options."""

    question_field: str = "question"
    options_field: str = "options"
    option_fields: tuple[str, ...] = ()
    answer_field: str = "answer_idx"
    answer_format: str = "letter"
    id_field: str = ""
    context_field: str = ""
    subject_field: str = ""
    where: str = ""  # "field=value": keep only matching rows (e.g. question_type=mcq)


def _options_of(row: dict, fields: GenericFields, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """(letter -> text, original key -> letter). Empty options are dropped."""
    if fields.option_fields:
        raw = [(f, row.get(f)) for f in fields.option_fields]
    else:
        value = row.get(fields.options_field)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError(
                    f"{where}: field {fields.options_field!r} is not a JSON object or list"
                ) from None
        if isinstance(value, dict):
            raw = list(value.items())
        elif isinstance(value, list):
            raw = [(LETTERS[i], v) for i, v in enumerate(value)]
        else:
            raise DataError(f"{where}: field {fields.options_field!r} is missing or not an object/list")
    kept = [(str(k), str(v)) for k, v in raw if v is not None and str(v).strip()]
    letters_given = all(len(k) == 1 and k.upper() in LETTERS for k, _ in kept)
    options, key_to_letter = {}, {}
    for i, (key, text) in enumerate(kept):
        letter = key.upper() if letters_given and not fields.option_fields else LETTERS[i]
        options[letter] = text
        key_to_letter[key] = letter
    return options, key_to_letter


def _answer_letter(value, options: dict, key_to_letter: dict, fmt: str, where: str) -> str:
    value = str(value).strip()
    letters = list(options)
    if fmt == "letter":
        return value.strip("()").upper()
    if fmt in ("index0", "index1"):
        if not value.lstrip("-").isdigit():
            raise DataError(f"{where}: answer {value!r} is not an integer index")
        index = int(value) - (fmt == "index1")
        if not 0 <= index < len(letters):
            raise DataError(f"{where}: answer index {value} out of range for {len(letters)} options")
        return letters[index]
    if fmt == "key":
        if value not in key_to_letter:
            raise DataError(f"{where}: answer {value!r} is not one of the option keys {list(key_to_letter)}")
        return key_to_letter[value]
    matches = [k for k, v in options.items() if v.strip() == value]
    if len(matches) != 1:
        raise DataError(f"{where}: answer text {value[:60]!r} matches {len(matches)} options")
    return matches[0]


def read_generic(path: Path, fields: GenericFields) -> list[McqItem]:
    if fields.answer_format not in ANSWER_FORMATS:
        raise DataError(f"answer_format must be one of {ANSWER_FORMATS}, got {fields.answer_format!r}")
    rows = (
        read_jsonl(path)
        if path.suffix in (".jsonl", ".json")
        else read_csv(path, delimiter="\t" if path.suffix == ".tsv" else ",")
    )
    if fields.where:
        key, _, wanted = fields.where.partition("=")
        require_columns(path, rows[0], [key])
        rows = [r for r in rows if str(r.get(key, "")).strip() == wanted]
        if not rows:
            raise DataError(f"{path}: no row has {key} = {wanted!r}")
    needed = [fields.question_field, fields.answer_field]
    needed += list(fields.option_fields) or [fields.options_field]
    needed += [f for f in (fields.id_field, fields.context_field, fields.subject_field) if f]
    require_columns(path, rows[0], needed)
    items = []
    for number, row in enumerate(rows, 1):
        where = f"{path}: row {number}"
        options, key_to_letter = _options_of(row, fields, where)
        letter = _answer_letter(row[fields.answer_field], options, key_to_letter, fields.answer_format, where)
        item = McqItem(
            id=str(row[fields.id_field]) if fields.id_field else str(number),
            question=str(row[fields.question_field]),
            options=options,
            answer=letter,
            context=str(row[fields.context_field]) if fields.context_field else None,
            subject=str(row[fields.subject_field]) if fields.subject_field else None,
        )
        items.append(_checked(item, where))
    return unique_ids(items, path)
