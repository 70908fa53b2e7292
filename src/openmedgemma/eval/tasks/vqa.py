"""Visual question answering: VQA-RAD and SLAKE, in their official formats.

Scoring (stated in every result file):
- the answer is the line after the last "Final Answer" if present, else the whole output
  (thinking removed);
- token F1 (SQuAD-style normalisation, see `metrics`) averaged over open and closed questions;
- closed accuracy: strict normalised exact match over all CLOSED questions (no substring match:
  "yes, there is" is not "yes"); yes/no accuracy: the same over questions whose answer is yes/no.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from openmedgemma.errors import DataError

from ..dialogue import DIALOGUE_TURNS, chain_dialogues
from ..metrics import exact_match, mean_estimate, normalize_answer, token_f1
from ..parsing import free_text_answer
from ..prompts import vqa_prompt
from .base import ChatTask, Example, prompt_images, register, user_turn
from .files import find_containing, read_csv, read_json, require_columns

MAX_LISTED_IDS = 50


def _vqa_example(qid, question, answer, answer_type, image: Path, where: str) -> Example:
    kind = str(answer_type).strip().upper()
    if kind not in ("OPEN", "CLOSED"):
        raise DataError(f"{where}: answer_type {answer_type!r} is neither OPEN nor CLOSED")
    return Example(
        id=str(qid),
        messages=user_turn(vqa_prompt(str(question).strip()), image=str(image)),
        target=str(answer).strip(),
        meta={"answer_type": kind},
    )


def _check_images(examples: list[Example], folder: Path, task: str) -> None:
    paths = {Path(image) for ex in examples for image in prompt_images(ex.messages)}
    missing = sorted(str(p.relative_to(folder)) for p in paths if not p.is_file())
    if missing:
        raise DataError(f"{task}: {len(missing)} image(s) missing from {folder} (e.g. {missing[:3]})")


class VqaTask(ChatTask):
    max_new_tokens = 64
    primary_metric = "token_f1"

    def notes(self) -> list[str]:
        return [
            "Prompt: the report's VQA prompt verbatim, image first.",
            "Token F1: lower-case, punctuation and articles (a/an/the) removed, whitespace split, "
            "SQuAD F1; averaged over open and closed questions.",
            "Closed accuracy: strict normalised exact match over all CLOSED questions; yes/no "
            "accuracy: the same over questions whose reference answer is yes or no.",
        ]

    def score(self, examples: list[Example], outputs: list[str], *, n_boot: int, seed: int) -> dict:
        answers = [free_text_answer(out) for out in outputs]
        golds = [ex.target for ex in examples]
        f1 = np.array([token_f1(a, g) for a, g in zip(answers, golds)])
        match = np.array([exact_match(a, g) for a, g in zip(answers, golds)], dtype=float)
        closed = np.array([ex.meta["answer_type"] == "CLOSED" for ex in examples])
        yes_no = np.array([normalize_answer(g) in ("yes", "no") for g in golds])
        metrics = {
            "token_f1": mean_estimate(f1, n_boot=n_boot, seed=seed),
            "closed_accuracy": mean_estimate(match[closed], n_boot=n_boot, seed=seed),
            "yes_no_accuracy": mean_estimate(match[yes_no], n_boot=n_boot, seed=seed),
            "token_f1_open": mean_estimate(f1[~closed], n_boot=n_boot, seed=seed),
            "token_f1_closed": mean_estimate(f1[closed], n_boot=n_boot, seed=seed),
        }
        empty = [ex.id for ex, a in zip(examples, answers) if not normalize_answer(a)]
        cols = ["yes", "no", "other"]
        matrix = np.zeros((2, 3), dtype=int)
        for a, g, is_yn in zip(answers, golds, yes_no):
            if is_yn:
                said = normalize_answer(a)
                matrix[
                    ["yes", "no"].index(normalize_answer(g)),
                    cols.index(said if said in cols[:2] else "other"),
                ] += 1
        return {
            "metrics": metrics,
            "counts": {
                "n": len(examples),
                "open": int((~closed).sum()),
                "closed": int(closed.sum()),
                "yes_no": int(yes_no.sum()),
                "unparseable": len(empty),
                "unparseable_ids": empty[:MAX_LISTED_IDS],
            },
            "per_example": [
                {"id": ex.id, "gold": g, "answer": a, "token_f1": float(s), "exact": bool(m)}
                for ex, g, a, s, m in zip(examples, golds, answers, f1, match)
            ],
            "confusion": [
                {
                    "title": f"{self.name}: yes/no questions, gold (rows) vs answer",
                    "rows": ["yes", "no"],
                    "cols": cols,
                    "matrix": matrix.tolist(),
                }
            ],
        }

    def baseline_outputs(self, examples: list[Example]) -> dict[str, list[str]]:
        by_type = {}
        for kind in ("OPEN", "CLOSED"):
            answers = Counter(
                normalize_answer(ex.target) for ex in examples if ex.meta["answer_type"] == kind
            )
            by_type[kind] = answers.most_common(1)[0][0] if answers else ""
        label = f"majority per answer type (closed: {by_type['CLOSED']!r}, open: {by_type['OPEN']!r})"
        return {label: [by_type[ex.meta["answer_type"]] for ex in examples]}


@register
class VqaRad(VqaTask):
    name = "vqa-rad"
    description = "VQA-RAD: balanced split (report) or the official phrase_type split"
    option_defaults = {"split": "balanced", "part": "test"}
    folders = ("vqa_rad", "VQA_RAD", "")
    json_name = "VQA_RAD Dataset Public.json"
    image_folder = "VQA_RAD Image Folder"
    split_file = "vqa_rad_balanced_split.tsv"

    def load_examples(self) -> list[Example]:
        folder = find_containing(self.data_dir, self.folders, self.json_name, self.name)
        path = folder / self.json_name
        rows = read_json(path)
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            raise DataError(f"{path}: expected a JSON list of question records")
        require_columns(
            path, rows[0], ["qid", "image_name", "question", "answer", "answer_type", "phrase_type"]
        )
        keep = self._selected_qids(folder, rows)
        images = folder / self.image_folder
        examples = [
            _vqa_example(
                r["qid"],
                r["question"],
                r["answer"],
                r["answer_type"],
                images / r["image_name"],
                f"{path}: qid {r['qid']}",
            )
            for r in rows
            if keep(r)
        ]
        if not examples:
            raise DataError(
                f"{self.name}: split {self.options['split']}/{self.options['part']} selects no question"
            )
        _check_images(examples, images, self.name)
        return examples

    def _selected_qids(self, folder: Path, rows: list[dict]):
        split, part = self.options["split"], self.options["part"]
        if split == "official":
            wanted = {"test": ("test_freeform", "test_para"), "train": ("freeform", "para")}
            if part not in wanted:
                raise DataError(f"{self.name}: the official split has parts test and train, not {part!r}")
            return lambda r: r["phrase_type"] in wanted[part]
        if split != "balanced":
            raise DataError(f"{self.name}: split must be balanced or official, got {split!r}")
        path = folder / self.split_file
        if not path.is_file():
            raise DataError(f"{self.name}: balanced split file {path} not found")
        table = read_csv(path, delimiter="\t")
        require_columns(path, table[0], ["QID_unique", "SPLIT_BALANCED"])
        parts = {r["SPLIT_BALANCED"] for r in table}
        if part not in parts:
            raise DataError(f"{path}: no rows with SPLIT_BALANCED = {part!r} (have {sorted(parts)})")
        qids = {r["QID_unique"].strip() for r in table if r["SPLIT_BALANCED"] == part}
        known = {str(r["qid"]) for r in rows}
        unknown = qids - known
        if unknown:
            raise DataError(
                f"{path}: {len(unknown)} QID_unique value(s) not in the JSON (e.g. {sorted(unknown)[:3]})"
            )
        return lambda r: str(r["qid"]) in qids

    def notes(self) -> list[str]:
        return super().notes() + [
            "VQA-RAD: split 'balanced' = vqa_rad_balanced_split.tsv (QID_unique == JSON qid), as in "
            "the report; answer_type is stripped ('CLOSED ' counts as CLOSED); numeric answers are "
            "compared as text."
        ]


@register
class VqaRadDialogue(VqaRad):
    """VQA-RAD questions about one image chained into conversations (`openmedgemma.eval.dialogue`), scored on
    the follow-up turns: what a model answers to a second or third question in a chat."""

    name = "vqa-rad-dialogue"
    description = "VQA-RAD follow-up turns: questions about one image chained into a conversation (balanced test)"
    # first=bare: turn 1 is the bare question too, as a chat user types it (default: the report's VQA prompt)
    option_defaults = {"split": "balanced", "part": "test", "turns": DIALOGUE_TURNS, "first": "report"}

    def load_examples(self) -> list[Example]:
        turns = self.options["turns"]
        if turns < 2:
            raise DataError(f"{self.name}: turns must be >= 2 (a dialogue needs a follow-up), got {turns}")
        if self.options["first"] not in ("report", "bare"):
            raise DataError(f"{self.name}: first must be report or bare, got {self.options['first']!r}")
        single = super().load_examples()
        folder = find_containing(self.data_dir, self.folders, self.json_name, self.name)
        rows = {str(r["qid"]): r for r in read_json(folder / self.json_name)}
        chains = chain_dialogues(single, lambda ex: rows[ex.id]["image_name"],
                                 lambda ex: rows[ex.id].get("qid_linked_id", ex.id), turns)  # fmt: skip
        examples = []
        for chain in chains:
            history = list(chain[0].messages)
            if self.options["first"] == "bare":
                image = history[0]["content"][0]
                history = user_turn(str(rows[chain[0].id]["question"]).strip(), image=image["image"])
            for turn, ex in enumerate(chain, 1):
                if turn > 1:
                    messages = history + [{"role": "user", "content": str(rows[ex.id]["question"]).strip()}]
                    history_ids = [earlier.id for earlier in chain[: turn - 1]]
                    meta = {**ex.meta, "turn": turn, "history": history_ids}
                    examples.append(Example(ex.id, messages, ex.target, meta))
                    history = messages
                history = history + [{"role": "assistant", "content": ex.target}]
        if not examples:
            raise DataError(f"{self.name}: no image has two questions in this split, so there is no follow-up turn")
        self.data_info = {"dialogues": sum(len(c) > 1 for c in chains), "follow_up_turns": len(examples)}
        return examples

    def notes(self) -> list[str]:
        first = "report's VQA prompt" if self.options["first"] == "report" else "bare question"
        return super().notes() + [
            f"Dialogues: the questions about one image in file order, at most {self.options['turns']} per "
            "dialogue, never two paraphrases of one question (qid_linked_id) in one dialogue. Turn 1 is the "
            f"image with the {first}; each follow-up is the bare question. Earlier turns carry the "
            "reference answers (not the model's own), so every follow-up is scored on the same history. Only "
            "follow-up turns are scored (turn 1 is the vqa-rad task)."
        ]


@register
class Slake(VqaTask):
    name = "slake"
    description = "SLAKE (official JSON + imgs/ folder): English questions of the test split (1061)"
    option_defaults = {"split": "test", "lang": "en", "image_dir": ""}
    hidden_options = ("image_dir",)
    folders = ("Slake1.0", "slake", "SLAKE", "Slake", "")

    def load_examples(self) -> list[Example]:
        split = self.options["split"]
        if split not in ("test", "validate", "train"):
            raise DataError(f"{self.name}: split must be test, validate or train, got {split!r}")
        folder = find_containing(self.data_dir, self.folders, f"{split}.json", self.name)
        path = folder / f"{split}.json"
        rows = read_json(path)
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            raise DataError(f"{path}: expected a JSON list of question records")
        require_columns(path, rows[0], ["qid", "img_name", "question", "answer", "answer_type", "q_lang"])
        images = Path(self.options["image_dir"]) if self.options["image_dir"] else folder / "imgs"
        if not images.is_dir():
            raise DataError(
                f"{self.name}: image folder {images} not found (SLAKE images are not "
                "redistributed here; give the folder with --task-option image_dir=PATH)"
            )
        rows = [r for r in rows if r["q_lang"] == self.options["lang"]]
        if not rows:
            raise DataError(f"{path}: no question with q_lang = {self.options['lang']!r}")
        examples = [
            _vqa_example(
                r["qid"],
                r["question"],
                r["answer"],
                r["answer_type"],
                images / r["img_name"],
                f"{path}: qid {r['qid']}",
            )
            for r in rows
        ]
        _check_images(examples, images, self.name)
        return examples

    def notes(self) -> list[str]:
        return super().notes() + ["SLAKE: default split, English questions only (q_lang == 'en')."]
