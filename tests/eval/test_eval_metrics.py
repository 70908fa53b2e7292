"""Metrics against hand-worked values and independent computations (scikit-learn, numpy)."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from openmedgemma.eval import report_metrics as rm
from openmedgemma.eval.metrics import (
    binary_f1,
    bootstrap_ci,
    bootstrap_mean_ci,
    exact_match,
    macro_f1,
    mean_estimate,
    normalize_answer,
    roc_auc,
    token_f1,
)
from openmedgemma.eval.tasks.embedding import fast_auc


def test_normalization_is_the_stated_one():
    assert normalize_answer("The  Left-Lung, a lobe!") == "leftlung lobe"
    assert normalize_answer("An X-ray of THE chest.") == "xray of chest"
    assert normalize_answer(" superficial to the patient's skin") == "superficial to patients skin"
    assert normalize_answer(4) == "4"


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("left lung", "left lung", 1.0),
        ("the left lung", "Left lung.", 1.0),  # article and punctuation removed
        ("left upper lobe", "right upper lobe", 2 / 3),  # P = R = 2/3
        ("left lung", "left upper lobe of the lung", 4 / 7),  # P = 2/2, R = 2/5 ("the" dropped) -> 4/7
        ("yes yes", "yes", 2 * 0.5 * 1.0 / 1.5),  # multiset overlap 1: P = 1/2, R = 1
        ("no", "yes", 0.0),
        ("", "", 1.0),
        ("the", "a", 1.0),  # both empty after normalisation
        ("", "yes", 0.0),
        # repeated tokens: the overlap is a multiset (SQuAD's Counter &), each copy counts at most as often as
        # it appears on both sides; a set would count "effusion" once in all of these
        ("effusion effusion", "effusion effusion left", 2 * 1.0 * (2 / 3) / (1 + 2 / 3)),  # shared 2: P 1, R 2/3
        ("effusion effusion effusion", "effusion effusion", 2 * (2 / 3) * 1.0 / (2 / 3 + 1)),  # shared 2: P 2/3, R 1
        ("no no no no", "no no", 2 * 0.5 * 1.0 / 1.5),  # shared 2: P 2/4, R 2/2
        ("left lung left lung", "left lung", 2 * 0.5 * 1.0 / 1.5),  # shared 2 of 4 predicted
    ],
)
def test_token_f1_hand_worked(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_exact_match_is_strict():
    assert exact_match("Yes.", "yes") and exact_match("the liver", "Liver")
    assert not exact_match("yes, there is", "yes")
    assert not exact_match("no", "not sure")
    assert not exact_match("yes", "no")


def test_bootstrap_is_deterministic_and_matches_an_independent_loop():
    rng = np.random.default_rng(0)
    values = (rng.random(300) < 0.62).astype(float)
    low, high = bootstrap_mean_ci(values, n_boot=500, seed=11)
    assert (low, high) == bootstrap_mean_ci(values, n_boot=500, seed=11)
    assert (low, high) != bootstrap_mean_ci(values, n_boot=500, seed=12)
    assert low < values.mean() < high

    # independent percentile bootstrap written out here
    draw = np.random.default_rng(11)
    means = [values[draw.integers(0, 300, 300)].mean() for _ in range(500)]
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    # the generic form, with the same seed, draws the same resamples
    g_low, g_high, dropped = bootstrap_ci(lambda idx: values[idx].mean(), 300, n_boot=500, seed=11)
    assert (g_low, g_high, dropped) == (low, high, 0)
    # and a normal-approximation interval is close to it
    se = values.std() / math.sqrt(300)
    assert abs(low - (values.mean() - 1.96 * se)) < 0.02 and abs(high - (values.mean() + 1.96 * se)) < 0.02


def test_bootstrap_drops_undefined_resamples():
    y = np.array([0] * 29 + [1])
    low, high, dropped = bootstrap_ci(lambda idx: roc_auc(y[idx], np.arange(30)[idx]), 30, n_boot=200, seed=0)
    assert 0 < dropped < 200 and 0 <= low <= high <= 1


def test_mean_estimate_record():
    est = mean_estimate([1, 0, 1, 1], n_boot=100, seed=0)
    assert est["value"] == 0.75 and est["n"] == 4 and est["ci_low"] <= 0.75 <= est["ci_high"]


def test_f1_against_scikit_learn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 500)
    y_pred = rng.choice([0, 1, -1], 500, p=[0.45, 0.45, 0.1])  # -1 = unparseable
    for positive in (0, 1):
        expected = f1_score(y_true, y_pred, labels=[positive], average="macro")
        assert binary_f1(y_true, y_pred, positive) == pytest.approx(expected)
    assert macro_f1(y_true, y_pred, labels=[0, 1]) == pytest.approx(
        (binary_f1(y_true, y_pred, 0) + binary_f1(y_true, y_pred, 1)) / 2
    )


def test_macro_f1_hand_worked_and_undefined_class():
    # class 1: tp 1, fp 1, fn 1 -> 0.5 ; class 0: tp 0, fp 1, fn 2 -> 0 (the unparseable -1 is wrong)
    assert macro_f1([1, 1, 0, 0], [1, 0, 1, -1], labels=[0, 1]) == pytest.approx(0.25)
    assert macro_f1([1, 1, 0, 0], [1, 0, 0, 0], labels=[0, 1]) == pytest.approx((2 / 3 + 0.8) / 2)
    assert math.isnan(binary_f1(np.array([0, 0]), np.array([0, 0])))
    assert macro_f1([0, 0], [0, 0], labels=[0, 1]) == 1.0  # class 1 absent everywhere: left out


def test_auc_against_scikit_learn_with_ties():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    scores = np.round(rng.random(400) + 0.3 * y, 1)  # many ties
    assert fast_auc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    assert roc_auc([1, 1], [0.2, 0.3]) is None and fast_auc(np.array([0, 0]), np.array([1.0, 2.0])) is None


def test_bleu4_hand_worked():
    candidate, reference = "the cat sat on the mat", "the cat sat on a mat"
    # clipped matches / totals: 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; c = r = 6
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert rm.corpus_bleu4([candidate], [reference]) == pytest.approx(expected)
    # brevity penalty: candidate of 4 tokens against a 6-token reference, all n-grams matching
    assert rm.corpus_bleu4(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(
        math.exp(1 - 6 / 4)
    )
    assert rm.corpus_bleu4(["cardiomegaly"], ["mild cardiomegaly"]) == 0.0  # no 4-gram: no smoothing
    # corpus-level: counts are pooled before the geometric mean
    pooled = rm.corpus_bleu4(
        [candidate, "no acute disease here today"], [reference, "no acute disease here today"]
    )
    expected = ((5 + 5) / (6 + 5) * (3 + 4) / (5 + 4) * (2 + 3) / (4 + 3) * (1 + 2) / (3 + 2)) ** 0.25
    assert pooled == pytest.approx(expected)


def test_rouge_l_hand_worked():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 -> P = R = 5/6
    assert rm.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = 2 ("heart enlarged"): P = 2/3, R = 2/4 -> F = 4/7
    assert rm.rouge_l("heart is enlarged", "the heart appears enlarged") == pytest.approx(4 / 7)
    assert rm.rouge_l("", "anything") == 0.0


def test_finding_extraction_with_negation():
    report = (
        "Heart size is enlarged consistent with cardiomegaly. No pneumothorax or pleural effusion. "
        "Left basilar atelectasis; without focal consolidation.\nFractures of the left ribs."
    )
    assert rm.positive_findings(report) == {"cardiomegaly", "atelectasis", "fracture"}
    assert rm.positive_findings("There is no evidence of pneumothorax. Lungs are clear.") == set()
    counts = rm.finding_counts("Cardiomegaly and small effusion.", report)
    # predicted {cardiomegaly, pleural effusion} vs {cardiomegaly, atelectasis, fracture}
    assert counts.tolist() == [1, 1, 2]
    assert rm.f1_from_counts(counts) == pytest.approx(2 / (2 + 1 + 2))
