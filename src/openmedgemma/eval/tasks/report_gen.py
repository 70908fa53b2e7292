"""Chest X-ray report generation: IU X-ray and MIMIC-CXR (BLEU-4, ROUGE-L, finding F1).

RadGraph F1, the report's metric, needs the RadGraph model, which is not available here: results
say so and carry no RadGraph number.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from openmedgemma.errors import DataError

from .. import report_metrics as rm
from ..metrics import bootstrap_ci, estimate, mean_estimate
from ..parsing import strip_thinking
from ..prompts import REPORT_PROMPT
from . import report_formats as rf
from .base import ChatTask, Example, register, user_turn
from .cxr_sources import apply_image_policy
from .files import require_dir

RADGRAPH_NOTE = (
    "RadGraph F1 (the report's metric) is NOT computed: it needs the RadGraph model, "
    "which is not available here."
)


class ReportTask(ChatTask):
    max_new_tokens = 300
    primary_metric = "rouge_l"
    option_defaults = {"images": "all", "split": "test"}

    def read_items(self) -> list[rf.ReportItem]:
        raise NotImplementedError

    def load_examples(self) -> list[Example]:
        items, n_missing = apply_image_policy(self.read_items(), self.options["images"], self.name)
        self.data_info = {"reports": len(items), "images_left_out_missing": n_missing}
        return [Example(it.id, user_turn(REPORT_PROMPT, image=str(it.image)), it.reference) for it in items]

    def notes(self) -> list[str]:
        return [
            "Prompt: ours (the report does not publish its report-generation prompt): " + REPORT_PROMPT,
            "Reference = FINDINGS + IMPRESSION. Tokens: lower-case [a-z0-9]+ runs. BLEU-4: corpus, "
            "no smoothing. ROUGE-L: LCS F1 (beta 1) averaged over reports. Finding F1: keyword "
            "conditions with simple same-sentence negation, micro over (report, condition).",
            RADGRAPH_NOTE,
        ]

    def score(self, examples: list[Example], outputs: list[str], *, n_boot: int, seed: int) -> dict:
        answers = [strip_thinking(o) for o in outputs]
        refs = [ex.target for ex in examples]
        bleu = np.array([rm.bleu_counts(a, r) for a, r in zip(answers, refs)])
        rouge = np.array([rm.rouge_l(a, r) for a, r in zip(answers, refs)])
        findings = np.array([rm.finding_counts(a, r) for a, r in zip(answers, refs)])
        n = len(examples)
        b_low, b_high, _ = bootstrap_ci(
            lambda i: rm.bleu4_from_counts(bleu[i].sum(0)), n, n_boot=n_boot, seed=seed
        )
        f_low, f_high, _ = bootstrap_ci(
            lambda i: rm.f1_from_counts(findings[i].sum(0)), n, n_boot=n_boot, seed=seed
        )
        metrics = {
            "rouge_l": mean_estimate(rouge, n_boot=n_boot, seed=seed),
            "bleu4": estimate(rm.bleu4_from_counts(bleu.sum(0)), (b_low, b_high), n),
            "finding_f1": estimate(rm.f1_from_counts(findings.sum(0)), (f_low, f_high), n),
        }
        empty = [ex.id for ex, a in zip(examples, answers) if not a.strip()]
        return {
            "metrics": metrics,
            "counts": {
                "n": n,
                "unparseable": len(empty),
                "unparseable_ids": empty[:50],
                "radgraph_f1": "not computed (needs the RadGraph model, not available here)",
            },
            "per_example": [{"id": ex.id, "rouge_l": float(s)} for ex, s in zip(examples, rouge)],
        }

    def baseline_outputs(self, examples: list[Example]) -> dict[str, list[str]]:
        common = Counter(ex.target for ex in examples).most_common(1)[0][0]
        return {"most common reference report": [common] * len(examples)}


@register
class IuXrayReport(ReportTask):
    name = "iu-xray-report"
    description = "IU X-ray (OpenI) report generation: R2Gen annotation.json, indiana_reports.csv or the ecgen XML"
    # IU X-ray has no official split: the CSV and XML forms give all reports; R2Gen's annotation.json has one
    # (split: its test part by default)
    option_defaults = {"images": "all", "split": ""}
    folders = ("", "iu_xray", "iu-xray", "IU_XRay")

    def read_items(self) -> list[rf.ReportItem]:
        root = require_dir(self.data_dir, self.name)
        split = self.options["split"]
        for folder in self.folders:
            if (root / folder / rf.R2GEN_FILE).is_file():
                return rf.read_r2gen(root / folder / rf.R2GEN_FILE, split or "test", self.name)
            if split:
                continue
            if (root / folder / "indiana_reports.csv").is_file():
                return rf.read_iu_csv(root / folder / "indiana_reports.csv")
            if (root / folder / "ecgen-radiology").is_dir():
                return rf.read_iu_xml(root / folder / "ecgen-radiology")
        if split:
            raise DataError(f"{self.name}: split={split} needs R2Gen's {rf.R2GEN_FILE} (the CSV and XML forms have "
                            f"no split), none found under {root}")  # fmt: skip
        raise DataError(
            f"{self.name}: none of {rf.R2GEN_FILE}, indiana_reports.csv or ecgen-radiology/ found under {root}"
        )


@register
class MimicCxrReport(ReportTask):
    name = "mimic-cxr-report"
    description = "MIMIC-CXR report generation (R2Gen annotation.json, or reports files/ + split CSV + JPG images)"
    folders = ("", "mimic-cxr-jpg/2.0.0", "mimic-cxr-jpg", "mimic-cxr", "mimic_cxr")

    def read_items(self) -> list[rf.ReportItem]:
        root = require_dir(self.data_dir, self.name)
        for folder in self.folders:
            if (root / folder / rf.R2GEN_FILE).is_file():
                return rf.read_r2gen(root / folder / rf.R2GEN_FILE, self.options["split"], self.name)
        for folder in self.folders:
            if (root / folder / "files").is_dir():
                return rf.read_mimic_reports(root / folder, self.options["split"])
        raise DataError(f"{self.name}: no {rf.R2GEN_FILE} and no files/ folder of reports under {root}")
