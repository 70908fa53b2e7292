"""Text multiple-choice tasks: MedQA, MedMCQA, PubMedQA, MMLU-Med, MedXpertQA and a generic MCQ."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from openmedgemma.errors import DataError

from ..metrics import estimate, mean_estimate
from ..parsing import parse_choice
from ..prompts import mcq_prompt
from . import mcq_formats as fmt
from .base import ChatTask, Example, register, user_turn
from .files import find_dir, find_file, require_dir

UNPARSEABLE = "unparseable"
MAX_LISTED_IDS = 50


class McqTask(ChatTask):
    """Shared behaviour; subclasses implement `read_items`."""

    max_new_tokens = 1024
    primary_metric = "accuracy"
    option_defaults = {"file": ""}
    candidates: tuple[str, ...] = ()

    def data_file(self) -> Path:
        if self.options.get("file"):
            path = Path(self.options["file"])
            path = path if path.is_absolute() else require_dir(self.data_dir, self.name) / path
            if not path.is_file():
                raise DataError(f"{self.name}: data file {path} does not exist")
            return path
        return find_file(self.data_dir, self.candidates, self.name)

    def read_items(self) -> list[fmt.McqItem]:
        return fmt.read_standard_jsonl(self.data_file())

    def load_examples(self) -> list[Example]:
        return [
            Example(
                id=item.id,
                messages=user_turn(mcq_prompt(item.question, item.options, item.context)),
                target=item.answer,
                meta={"options": item.options, "subject": item.subject},
            )
            for item in self.read_items()
        ]

    def notes(self) -> list[str]:
        return [
            "Prompt: the report's MCQ prompt verbatim; options listed as '(A) text' lines after the "
            "question; for N != 4 options 'four' is replaced by N in words.",
            "Answers parsed from the last 'Final Answer' (thinking blocks removed); unparseable "
            "answers count as wrong and are reported separately.",
        ]

    def score(self, examples: list[Example], outputs: list[str], *, n_boot: int, seed: int) -> dict:
        parsed = [parse_choice(out, ex.meta["options"]) for ex, out in zip(examples, outputs)]
        correct = np.array([p == ex.target for p, ex in zip(parsed, examples)], dtype=float)
        metrics = {"accuracy": mean_estimate(correct, n_boot=n_boot, seed=seed)}
        subjects = sorted({ex.meta["subject"] for ex in examples if ex.meta.get("subject")})
        breakdown = {}
        for subject in subjects:
            mask = np.array([ex.meta.get("subject") == subject for ex in examples])
            breakdown[subject] = mean_estimate(correct[mask], n_boot=n_boot, seed=seed)
        if len(subjects) > 1:
            means = [b["value"] for b in breakdown.values()]
            metrics["accuracy_macro_over_subjects"] = estimate(
                float(np.mean(means)), (np.nan, np.nan), len(examples)
            )
        letters = sorted({letter for ex in examples for letter in ex.meta["options"]})
        labels = letters + [UNPARSEABLE]
        index = {label: i for i, label in enumerate(labels)}
        matrix = np.zeros((len(letters), len(labels)), dtype=int)
        for ex, p in zip(examples, parsed):
            matrix[index[ex.target], index[p or UNPARSEABLE]] += 1
        unparseable = [ex.id for ex, p in zip(examples, parsed) if p is None]
        return {
            "metrics": metrics,
            "breakdown": {"by_subject": breakdown} if breakdown else {},
            "counts": {
                "n": len(examples),
                "correct": int(correct.sum()),
                "unparseable": len(unparseable),
                "unparseable_ids": unparseable[:MAX_LISTED_IDS],
            },
            "per_example": [
                {"id": ex.id, "gold": ex.target, "parsed": p, "correct": bool(c)}
                for ex, p, c in zip(examples, parsed, correct)
            ],
            "confusion": [
                {
                    "title": f"{self.name}: gold (rows) vs answer",
                    "rows": letters,
                    "cols": labels,
                    "matrix": matrix.tolist(),
                }
            ],
        }

    def baseline_outputs(self, examples: list[Example]) -> dict[str, list[str]]:
        majority = Counter(ex.target for ex in examples).most_common(1)[0][0]
        return {f"majority (always {majority})": [f"Final Answer: ({majority})"] * len(examples)}

    def baselines(self, examples: list[Example], *, n_boot: int, seed: int) -> dict[str, dict]:
        out = super().baselines(examples, n_boot=n_boot, seed=seed)
        chance = float(np.mean([1 / len(ex.meta["options"]) for ex in examples]))
        out["chance (uniform random letter)"] = {
            "accuracy": estimate(chance, (np.nan, np.nan), len(examples))
        }
        return out


@register
class MedQA(McqTask):
    name = "medqa"
    description = "MedQA-USMLE 4-option test (1273), MedAgentsBench JSONL"
    candidates = ("text_mcqa/medqa/test.jsonl", "medqa/test.jsonl", "test.jsonl")


@register
class MedMCQA(McqTask):
    name = "medmcqa"
    description = "MedMCQA dev, JSONL (the shared copy is the 2816 single-answer subset)"
    candidates = ("text_mcqa/medmcqa/test.jsonl", "medmcqa/test.jsonl", "test.jsonl")

    def notes(self) -> list[str]:
        return super().notes() + [
            "The report evaluates all 4183 dev questions; a file with fewer questions (e.g. the "
            "2816 single-answer subset) is not directly comparable with the published number."
        ]


@register
class PubMedQA(McqTask):
    name = "pubmedqa"
    description = "PubMedQA PQA-L test (500): ori_pqal.json + test_ground_truth.json, or JSONL"
    option_defaults = {"file": "", "format": "auto"}
    candidates = ("text_mcqa/pubmedqa/test.jsonl", "pubmedqa/test.jsonl", "test.jsonl")
    original = ("pubmedqa/ori_pqal.json", "ori_pqal.json")

    def read_items(self) -> list[fmt.McqItem]:
        form = self.options["format"]
        if form not in ("auto", "original", "jsonl"):
            raise DataError(f"{self.name}: format must be auto, original or jsonl, got {form!r}")
        if form == "jsonl" or self.options["file"]:
            return fmt.read_pubmedqa_jsonl(self.data_file())
        root = require_dir(self.data_dir, self.name)
        pqal = next((root / c for c in self.original if (root / c).is_file()), None)
        if pqal is None and form == "original":
            find_file(root, self.original, self.name)  # raises with the list of places looked at
        if pqal is None:
            return fmt.read_pubmedqa_jsonl(self.data_file())
        truth = pqal.parent / "test_ground_truth.json"
        if not truth.is_file():
            raise DataError(f"{self.name}: {truth} not found next to {pqal.name} (it lists the 500 test ids)")
        return fmt.read_pubmedqa_original(pqal, truth)

    def notes(self) -> list[str]:
        return super().notes() + [
            "PubMedQA: the report's context sentence and the context (the abstract's paragraphs "
            "joined by newlines) are placed before 'Question:'; options (A) yes (B) no (C) maybe."
        ]


@register
class MmluMed(McqTask):
    name = "mmlu-med"
    description = "MMLU medical subjects, per subject and aggregate (JSONL or the CSV form)"
    option_defaults = {"file": "", "format": "auto", "subjects": ()}
    candidates = ("text_mcqa/mmlu/test.jsonl", "mmlu/test.jsonl", "test.jsonl")
    csv_dirs = ("mmlu_medical_csv/test", "mmlu/test", "test")

    def read_items(self) -> list[fmt.McqItem]:
        form, subjects = self.options["format"], tuple(self.options["subjects"])
        if form not in ("auto", "jsonl", "csv"):
            raise DataError(f"{self.name}: format must be auto, jsonl or csv, got {form!r}")
        if form == "csv" or (form == "auto" and not self.options["file"] and not self._has_jsonl()):
            items = fmt.read_mmlu_csv_dir(find_dir(self.data_dir, self.csv_dirs, self.name), subjects)
        else:
            items = fmt.read_standard_jsonl(self.data_file())
            missing = [i.id for i in items if not i.subject]
            if missing:
                raise DataError(f"{self.data_file()}: rows without a 'subject' field (e.g. id {missing[0]})")
            items = [i for i in items if not subjects or i.subject in subjects]
        if not items:
            raise DataError(f"{self.name}: no questions for subjects {list(subjects)}")
        return items

    def _has_jsonl(self) -> bool:
        root = require_dir(self.data_dir, self.name)
        return any((root / c).is_file() for c in self.candidates)

    def notes(self) -> list[str]:
        return super().notes() + [
            "MMLU-Med aggregate = accuracy pooled over all questions; per-subject accuracies are "
            "in the breakdown. The report counts 7 subjects; the shared data has 6."
        ]


@register
class MedXpertQA(McqTask):
    name = "medxpertqa"
    description = "MedXpertQA Text (10 options): reasoning (r) + understanding (u) subsets, JSONL"
    option_defaults = {"subsets": ("r", "u")}

    def read_items(self) -> list[fmt.McqItem]:
        items = []
        for subset in self.options["subsets"]:
            if subset not in ("r", "u"):
                raise DataError(f"{self.name}: subsets are r and u, got {subset!r}")
            candidates = (f"text_mcqa/medxpertqa-{subset}/test.jsonl", f"medxpertqa-{subset}/test.jsonl")
            path = find_file(self.data_dir, candidates, self.name)
            items.extend(fmt.read_standard_jsonl(path, subject=f"medxpertqa-{subset}"))
        return fmt.unique_ids(items, self.data_dir)

    def notes(self) -> list[str]:
        return super().notes() + [
            "MedXpertQA questions already list their 10 options ('Answer Choices: (A) ...'); they "
            "are not repeated, and the prompt says 'ten options'."
        ]


@register
class GenericMcq(McqTask):
    name = "mcq"
    description = "Any JSONL/CSV MCQ file with N options, fields named by options (AfriMed-QA, MedBullets...)"
    option_defaults = {"file": "", **{k: v for k, v in vars(fmt.GenericFields()).items()}}

    @property
    def run_name(self) -> str:
        """mcq-<file stem>; the field options are recorded in predictions.jsonl's header."""
        return f"{self.name}-{Path(self.options['file']).stem}" if self.options["file"] else self.name

    def read_items(self) -> list[fmt.McqItem]:
        if not self.options["file"]:
            raise DataError(f"{self.name}: give the data file with --task-option file=PATH")
        fields = fmt.GenericFields(**{k: v for k, v in self.options.items() if k != "file"})
        return fmt.read_generic(self.data_file(), fields)
