"""Published numbers (MedGemma report v4, spec §5) to print beside ours.

Values are as published: percentages for accuracy / F1, fractions for AUC. Only rows whose
protocol a task reproduces are listed; `NOTES` says where the comparison is approximate.
"""

from __future__ import annotations

_MG = ("MedGemma 4B", "Gemma 3 4B", "MedGemma 27B", "Gemma 3 27B")


def _row(*values):
    return {model: v for model, v in zip(_MG, values) if v is not None}


PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "medqa": {"accuracy": _row(64.4, 50.7, 87.7, 74.9)},
    "medmcqa": {"accuracy": _row(55.7, 45.4, 74.2, 62.6)},
    "pubmedqa": {"accuracy": _row(73.4, 68.4, 76.8, 73.4)},
    "mmlu-med": {"accuracy": _row(70.0, 67.2, 87.0, None)},
    "medxpertqa": {"accuracy": _row(14.2, 11.6, 25.7, 15.7)},
    "mimic-cxr": {"macro_f1": _row(88.9, 81.2, None, 71.7)},
    "chexpert": {"macro_f1": _row(48.1, 32.6, None, 26.2)},
    "cxr14": {"macro_f1": _row(50.1, 32.0, None, 31.4)},
    "slake": {"token_f1": _row(72.3, 40.2, None, 42.5), "closed_accuracy": _row(87.6, 53.0, None, 64.5)},
    "vqa-rad": {"token_f1": _row(49.9, 33.6, None, 42.7), "closed_accuracy": _row(69.1, 48.7, None, 59.4)},
    "mimic-cxr-report": {"radgraph_f1": _row(29.5, None, None, None)},
    "ehrqa": {"accuracy": _row(67.6, 70.9, 86.3, 84.2)},
    "chexpert-zeroshot": {"auc": {"MedSigLIP-448": 0.844, "ELIXR": 0.824}},
}

NOTES = {
    "medmcqa": "published on all 4183 dev questions",
    "mmlu-med": "published over 7 subjects",
    "mimic-cxr": "published on the Med-Gemini test subset (not distributed)",
    "mimic-cxr-report": "published RadGraph F1 of the pretrained 4B; not computed here (no RadGraph model)",
    "ehrqa": "published on Google's EHRQA (42 LLM-rephrased question types, 10 categories, 19 test patients); "
    "ours are templated questions in 9 of its categories generated from the Synthea records given",
    "chexpert-zeroshot": "published AUC averaged over 13 findings",
}

PERCENT_METRICS = {"accuracy", "macro_f1", "token_f1", "closed_accuracy", "radgraph_f1"}


def published_for(task: str) -> dict[str, dict[str, float]]:
    return PUBLISHED.get(task, {})
