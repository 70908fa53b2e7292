"""Generative image classification: "Is there {condition} in this image? ... Final Answer: X".

Each (image, condition) pair is one question; the answer must start with yes or no (see
`parsing.parse_yes_no`), anything else is unparseable and counts as wrong for both classes.

- CXR tasks (mimic-cxr, chexpert, cxr14, cxr14-nih): macro F1 = mean over conditions of the F1
  of the positive class (scikit-learn); per-condition F1 and accuracy in the breakdown.
- pneumoniamnist: macro F1 over the two classes normal / pneumonia (scikit-learn).
Confidence intervals resample images (all questions about an image move together).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from ..metrics import binary_f1, bootstrap_ci, estimate, macro_f1, mean_estimate
from ..parsing import parse_yes_no
from ..prompts import cxr_prompt
from . import cxr_sources
from .base import ChatTask, Example, register, user_turn
from .medmnist import PNEUMONIA_CLASSES, gray_to_rgb, pneumonia_file, read_npz_split

MAX_LISTED_IDS = 50
_ANSWER_CODE = {"yes": 1, "no": 0, None: -1}


def _example(image_id: str, image: Any, condition: str, label: int) -> Example:
    return Example(
        id=f"{image_id}::{condition}",
        messages=user_turn(cxr_prompt(condition), image=image),
        target=int(label),
        meta={"condition": condition, "group": image_id},
    )


class YesNoTask(ChatTask):
    max_new_tokens = 512
    primary_metric = "macro_f1"

    def notes(self) -> list[str]:
        return [
            "Prompt: the report's 'Is there {condition} in this image? ... Final Answer: X' prompt "
            "verbatim, image first; one question per image and condition.",
            "The answer is the first word after the last 'Final Answer' (or of the output): yes or "
            "no; anything else is unparseable and counts as wrong.",
        ]

    def _macro(self, y_true: np.ndarray, y_pred: np.ndarray, conditions: np.ndarray, fast: bool) -> float:
        raise NotImplementedError

    def score(self, examples: list[Example], outputs: list[str], *, n_boot: int, seed: int) -> dict:
        parsed = [parse_yes_no(out) for out in outputs]
        y_pred = np.array([_ANSWER_CODE[p] for p in parsed])
        y_true = np.array([ex.target for ex in examples])
        conds = np.array([ex.meta["condition"] for ex in examples])
        groups = [ex.meta["group"] for ex in examples]
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        units = [np.array(v) for v in members.values()]

        def resampled(statistic):
            def stat(idx):
                rows = np.concatenate([units[i] for i in idx])
                return statistic(rows)

            return bootstrap_ci(stat, len(units), n_boot=n_boot, seed=seed)

        value = self._macro(y_true, y_pred, conds, fast=False)
        low, high, dropped = resampled(lambda r: self._macro(y_true[r], y_pred[r], conds[r], fast=True))
        correct = (y_true == y_pred).astype(float)
        low_acc, high_acc, _ = resampled(lambda r: correct[r].mean())
        metrics = {
            "macro_f1": estimate(
                value, (low, high), len(examples), bootstrap_units=len(units), resamples_dropped=dropped
            ),
            "accuracy": estimate(float(correct.mean()), (low_acc, high_acc), len(examples)),
        }
        breakdown, confusion = {}, []
        for cond in dict.fromkeys(conds):
            m = conds == cond
            breakdown[cond] = {
                "f1": macro_f1(y_true[m], y_pred[m], labels=[1]),
                "accuracy": mean_estimate(correct[m], n_boot=n_boot, seed=seed),
                "positives": int(y_true[m].sum()),
                "negatives": int((1 - y_true[m]).sum()),
                "unparseable": int((y_pred[m] == -1).sum()),
            }
            matrix = [[int(np.sum(m & (y_true == t) & (y_pred == p))) for p in (1, 0, -1)] for t in (1, 0)]
            confusion.append(
                {
                    "title": f"{cond}: gold (rows) vs answer",
                    "rows": ["yes", "no"],
                    "cols": ["yes", "no", "unparseable"],
                    "matrix": matrix,
                }
            )
        bad = [ex.id for ex, p in zip(examples, parsed) if p is None]
        return {
            "metrics": metrics,
            "breakdown": {"by_condition": breakdown},
            "counts": {
                "n": len(examples),
                "images": len(units),
                "positives": int(y_true.sum()),
                "unparseable": len(bad),
                "unparseable_ids": bad[:MAX_LISTED_IDS],
            },
            "per_example": [
                {"id": ex.id, "gold": int(t), "parsed": p} for ex, t, p in zip(examples, y_true, parsed)
            ],
            "confusion": confusion,
        }

    def baseline_outputs(self, examples: list[Example]) -> dict[str, list[str]]:
        majority = Counter(ex.target for ex in examples).most_common(1)[0][0]
        word = {1: "Yes", 0: "No"}
        out = {"always yes (prior baseline)": ["Final Answer: Yes"] * len(examples)}
        out[f"majority (always {word[majority].lower()})"] = [f"Final Answer: {word[majority]}"] * len(
            examples
        )
        return out


class CxrClassification(YesNoTask):
    dataset: str
    option_defaults = dict(cxr_sources.CXR_OPTION_DEFAULTS)

    def load_examples(self) -> list[Example]:
        items, conditions, self.data_info = cxr_sources.load_cxr(self, self.dataset)
        uncertain, missing = self.options["uncertain"], self.options["missing"]
        examples, skipped = [], Counter()
        for item in items:
            for name, column in conditions:
                label = cxr_sources.label_under_policy(item.labels[column], uncertain, missing)
                if label is None:
                    skipped[name] += 1
                    continue
                examples.append(_example(item.id, str(item.image), name, label))
        self.data_info["questions_excluded_by_label_policy"] = dict(skipped)
        return examples

    def _macro(self, y_true, y_pred, conditions, fast):
        f1s = np.array(
            [
                binary_f1(y_true[m], y_pred[m]) if fast else macro_f1(y_true[m], y_pred[m], labels=[1])
                for m in (conditions == c for c in dict.fromkeys(conditions))
            ]
        )
        return float(np.mean(f1s[~np.isnan(f1s)])) if (~np.isnan(f1s)).any() else math.nan

    def notes(self) -> list[str]:
        return super().notes() + [
            "Macro F1 = mean over conditions of the positive-class F1 (a condition with no positive "
            "reference and no 'yes' answer has no F1 and is left out). Label policy: uncertain "
            f"(-1) -> {self.options['uncertain']}, missing (blank) -> {self.options['missing']}."
        ]


@register
class MimicCxr(CxrClassification):
    name, dataset = "mimic-cxr", "mimic-cxr"
    description = "MIMIC-CXR-JPG test split, 5 conditions (CheXpert labeller labels)"

    def notes(self) -> list[str]:
        return super().notes() + [
            "The report uses the Med-Gemini MIMIC-CXR test subset, which is not "
            "distributed; this task uses the official test split (frontal views)."
        ]


@register
class CheXpert(CxrClassification):
    name, dataset = "chexpert", "chexpert"
    description = "CheXpert labels CSV (test_labels.csv / test.csv / valid.csv), 5 conditions"


@register
class Cxr14(CxrClassification):
    name, dataset = "cxr14", "cxr14"
    description = "ChestX-ray14 with Google expert labels: lung opacity, pneumothorax, fracture"


@register
class Cxr14Nih(CxrClassification):
    name, dataset = "cxr14-nih", "cxr14-nih"
    description = "ChestX-ray14 with the NIH 'Finding Labels' (no fracture / lung opacity labels)"

    def notes(self) -> list[str]:
        return super().notes() + [
            "NIH labels have no fracture or lung-opacity label; the report's "
            "CXR14 number uses the Google expert labels (task cxr14)."
        ]


@register
class PneumoniaMnist(YesNoTask):
    name = "pneumoniamnist"
    description = "PneumoniaMNIST (npz, 28x28 gray -> RGB): 'Is there pneumonia in this image?'"
    option_defaults = {"split": "test", "file": ""}

    def load_examples(self) -> list[Example]:
        path = pneumonia_file(self.data_dir, self.options["file"], self.name)
        images, labels = read_npz_split(path, self.options["split"])
        return [
            _example(f"{self.options['split']}-{i}", gray_to_rgb(img), "pneumonia", lab)
            for i, (img, lab) in enumerate(zip(images, labels))
        ]

    def _macro(self, y_true, y_pred, conditions, fast):
        if fast:
            f1s = np.array([binary_f1(y_true, y_pred, 0), binary_f1(y_true, y_pred, 1)])
            return float(np.mean(f1s[~np.isnan(f1s)])) if (~np.isnan(f1s)).any() else math.nan
        return macro_f1(y_true, y_pred, labels=[0, 1])

    def notes(self) -> list[str]:
        return super().notes() + [
            f"Macro F1 over the classes {PNEUMONIA_CLASSES}; images are the 28x28 "
            "grayscale arrays copied to RGB, not resized (the model's processor resizes)."
        ]
