"""Metrics for generated radiology reports.

- Tokens: lower-cased runs of letters and digits (``re.findall("[a-z0-9]+", text.lower())``).
- BLEU-4: corpus BLEU (Papineni et al. 2002) with one reference per report, uniform weights over
  1- to 4-grams, clipped counts, brevity penalty exp(1 - r/c) when c < r; no smoothing (0 when
  some n-gram order has no match).
- ROUGE-L: per report F1 (beta = 1) of the longest common subsequence, averaged over reports.
- Finding F1: the conditions a report states as present, found by keyword (`FINDING_TERMS`) with
  simple negation: a mention is negated when a negation cue (`NEGATION_CUES`) comes before it in
  the same sentence (sentences end at . ; ! ? or a newline). Micro F1 over (report, condition)
  pairs (1 when neither side states any finding). This is a rough clinical-correctness proxy,
  not CheXbert and not RadGraph.
- RadGraph F1 (the report's metric) needs the RadGraph model, which is not available here.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

FINDING_TERMS = {
    "atelectasis": ("atelectasis", "atelectatic"),
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "heart is enlarged", "cardiac enlargement"),
    "consolidation": ("consolidation", "consolidative"),
    "edema": ("edema", "oedema"),
    "pleural effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "pneumonia": ("pneumonia",),
    "lung opacity": ("opacity", "opacities", "opacification"),
    "fracture": ("fracture",),
    "nodule or mass": ("nodule", "mass"),
    "enlarged cardiomediastinum": (
        "widened mediastinum",
        "mediastinal widening",
        "enlarged cardiomediastinal",
    ),
}
NEGATION_CUES = (
    "no",
    "not",
    "without",
    "negative for",
    "free of",
    "absence of",
    "clear of",
    "resolved",
    "resolution of",
)
_SENTENCE_END = re.compile(r"[.;!?\n]+")


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu_counts(candidate: str, reference: str) -> np.ndarray:
    """[matches_1..4, totals_1..4, candidate length, reference length] for one report."""
    cand, ref = tokens(candidate), tokens(reference)
    matches, totals = [], []
    for n in range(1, 5):
        c, r = _ngrams(cand, n), _ngrams(ref, n)
        matches.append(sum((c & r).values()))
        totals.append(max(len(cand) - n + 1, 0))
    return np.array(matches + totals + [len(cand), len(ref)], dtype=float)


def bleu4_from_counts(counts: np.ndarray) -> float:
    """Corpus BLEU-4 from summed `bleu_counts` rows."""
    matches, totals, c, r = counts[:4], counts[4:8], counts[8], counts[9]
    if np.any(totals == 0) or np.any(matches == 0):
        return 0.0
    log_precision = float(np.mean(np.log(matches / totals)))
    brevity = 1.0 if c >= r else math.exp(1 - r / c)
    return brevity * math.exp(log_precision)


def corpus_bleu4(candidates: list[str], references: list[str]) -> float:
    return bleu4_from_counts(sum(bleu_counts(c, r) for c, r in zip(candidates, references)))


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    cand, ref = tokens(candidate), tokens(reference)
    lcs = _lcs(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def positive_findings(report: str) -> set[str]:
    """Conditions mentioned without a preceding negation cue in the same sentence."""
    found = set()
    for sentence in _SENTENCE_END.split(str(report).lower()):
        for condition, terms in FINDING_TERMS.items():
            for term in terms:
                for m in re.finditer(r"\b" + re.escape(term) + r"\w*", sentence):
                    before = sentence[: m.start()]
                    if not any(re.search(r"\b" + re.escape(cue) + r"\b", before) for cue in NEGATION_CUES):
                        found.add(condition)
    return found


def finding_counts(candidate: str, reference: str) -> np.ndarray:
    """[true positives, false positives, false negatives] over the conditions of one report."""
    pred, gold = positive_findings(candidate), positive_findings(reference)
    return np.array([len(pred & gold), len(pred - gold), len(gold - pred)], dtype=float)


def f1_from_counts(counts: np.ndarray) -> float:
    tp, fp, fn = counts
    return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else 1.0
