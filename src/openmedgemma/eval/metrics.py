"""Metrics and their 95% bootstrap confidence intervals.

- Confidence intervals: non-parametric bootstrap, percentile method, `n_boot` resamples of the
  evaluated units with replacement (default 1000), drawn from ``np.random.default_rng(seed)``;
  resamples where a metric is undefined (e.g. AUC with one class) are dropped and counted.
- Token F1 (SQuAD style): both strings are lower-cased, punctuation deleted ("x-ray" -> "xray"),
  the articles a / an / the removed, then split on whitespace; F1 of the multiset of shared tokens. Two empty
  strings score 1, one empty string scores 0.
- Strict exact match: the same normalisation, then string equality (no substring matching).
- Macro F1, AUC: scikit-learn. A class with no reference and no predicted example has no F1
  and is left out of a macro average.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np

DEFAULT_N_BOOT = 1000
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation + "“”‘’")


def normalize_answer(text: str) -> str:
    """SQuAD: lower-case, delete punctuation, drop the articles a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT_TABLE)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _percentile_interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    if stats.size == 0:
        return (math.nan, math.nan)
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, int]:
    """Percentile interval of `statistic(idx)` over `n_boot` resamples `idx` of range(n).

    Returns (low, high, n_dropped) where n_dropped counts resamples with an undefined value.
    """
    if n == 0:
        return (math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    stats, dropped = [], 0
    for _ in range(n_boot):
        value = statistic(rng.integers(0, n, n))
        if value is None or not np.isfinite(value):
            dropped += 1
        else:
            stats.append(value)
    low, high = _percentile_interval(np.asarray(stats, dtype=float), alpha)
    return low, high, dropped


def bootstrap_mean_ci(
    values: Sequence[float], *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Same resamples as `bootstrap_ci(lambda i: values[i].mean(), ...)`, vectorised."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    means = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        means.append(values[rng.integers(0, n, (rows, n))].mean(axis=1))
    return _percentile_interval(np.concatenate(means), alpha)


def estimate(value: float, ci: tuple[float, float], n: int, **extra) -> dict:
    """The record every metric is reported as."""
    out = {"value": _clean(value), "ci_low": _clean(ci[0]), "ci_high": _clean(ci[1]), "n": int(n)}
    out.update(extra)
    return out


def _clean(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def mean_estimate(values: Sequence[float], *, n_boot: int, seed: int) -> dict:
    values = np.asarray(values, dtype=float)
    value = float(values.mean()) if values.size else math.nan
    return estimate(value, bootstrap_mean_ci(values, n_boot=n_boot, seed=seed), values.size)


def binary_f1(y_true: np.ndarray, y_pred: np.ndarray, positive: int = 1) -> float:
    """F1 of class `positive`; any other prediction (including "unparseable") is not `positive`.

    NaN (undefined) when the class is neither in the references nor in the predictions.
    """
    tp = np.sum((y_true == positive) & (y_pred == positive))
    fp = np.sum((y_true != positive) & (y_pred == positive))
    fn = np.sum((y_true == positive) & (y_pred != positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else math.nan


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[int]) -> float:
    """scikit-learn macro F1 over `labels`; a prediction outside `labels` counts as wrong.

    A class absent from both references and predictions has no F1 and is left out of the mean
    (NaN if that leaves nothing).
    """
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(labels), average="macro", zero_division=np.nan))


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """scikit-learn ROC AUC, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    if np.unique(y_true).size < 2:
        return None
    return float(roc_auc_score(y_true, scores))
