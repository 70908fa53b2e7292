"""The harness neither flatters nor punishes: on the real data an oracle scores 100% and a seeded
random model scores near chance. Oracles answer by looking the question up in tables built here
from the raw data files, never through the harness's own readers.

Tolerances: |random accuracy - chance| < 0.05 on MedQA (n=1273, sd 0.012), < 0.08 on the VQA-RAD
yes/no questions (n=392, sd 0.025) and < 0.07 on PneumoniaMNIST (n=624, sd 0.020): each > 3 sd.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from eval_scripted import RandomModel, ScriptedModel, conversation_images, conversation_text, pixel_key
from openmedgemma.eval import get_task, run_task

N_BOOT = 200


@pytest.fixture(scope="module")
def medqa_answers(shared_data):
    rows = [json.loads(line) for line in open(shared_data / "text_mcqa/medqa/test.jsonl", encoding="utf-8")]
    return {r["question"]: r["answer_idx"] for r in rows}


def _medqa_question(conversation):
    text = conversation_text(conversation)
    return text.split("Question: ", 1)[1].split("\n(A) ", 1)[0]


def test_medqa_oracle_random_and_wrong(shared_data, tmp_path, medqa_answers):
    task = get_task("medqa", shared_data)
    oracle = ScriptedModel(
        lambda c: f"Summary... Final Answer: ({medqa_answers[_medqa_question(c)]})", "oracle"
    )
    res = run_task(task, oracle, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=64)
    assert res["counts"]["n"] == 1273 == oracle.seen
    assert res["metrics"]["accuracy"]["value"] == 1.0
    assert res["counts"]["unparseable"] == 0

    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    anti = ScriptedModel(
        lambda c: f"Final Answer: ({wrong[medqa_answers[_medqa_question(c)]]})", "anti-oracle"
    )
    res = run_task(task, anti, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=64)
    assert res["metrics"]["accuracy"]["value"] == 0.0

    rand = RandomModel("ABCD", "Let me think. Final Answer: ({})", seed=1)
    res = run_task(task, rand, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=64)
    acc = res["metrics"]["accuracy"]
    assert abs(acc["value"] - 0.25) < 0.05
    assert acc["ci_low"] < acc["value"] < acc["ci_high"]
    assert res["baselines"]["chance (uniform random letter)"]["accuracy"]["value"] == 0.25


@pytest.fixture(scope="module")
def vqa_rad_answers(shared_data):
    rows = json.loads((shared_data / "vqa_rad/VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    return {(r["image_name"], r["question"].strip()): str(r["answer"]).strip() for r in rows}


def _vqa_key(conversation):
    (image,) = conversation_images(conversation)
    assert Path(image).is_file()
    return Path(image).name, conversation_text(conversation).split("following question: ", 1)[1]


def test_vqa_rad_oracle_and_random(shared_data, tmp_path, vqa_rad_answers):
    task = get_task("vqa-rad", shared_data)
    oracle = ScriptedModel(lambda c: vqa_rad_answers[_vqa_key(c)], "oracle")
    res = run_task(task, oracle, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=64)
    counts = res["counts"]
    assert (
        counts["n"] == 735 and counts["closed"] == 432 and counts["open"] == 303 and counts["yes_no"] == 392
    )
    for metric in ("token_f1", "closed_accuracy", "yes_no_accuracy", "token_f1_open"):
        assert res["metrics"][metric]["value"] == 1.0, metric

    rand = RandomModel(["yes", "no"], "{}", seed=2)
    res = run_task(task, rand, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=64)
    assert abs(res["metrics"]["yes_no_accuracy"]["value"] - 0.5) < 0.08
    # only yes/no answers: the 40 closed questions with other answers and open ones are wrong
    assert res["metrics"]["closed_accuracy"]["value"] == pytest.approx(
        res["metrics"]["yes_no_accuracy"]["value"] * 392 / 432
    )


@pytest.fixture(scope="module")
def pneumonia_labels(shared_data):
    with np.load(shared_data / "medmnist/pneumoniamnist_28_varun19424.npz") as z:
        return {pixel_key(im): int(lab) for im, lab in zip(z["test_images"], z["test_labels"][:, 0])}


def _pneumonia_image(conversation):
    (image,) = conversation_images(conversation)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert "Is there pneumonia in this image?" in conversation_text(conversation)
    return image


def test_pneumoniamnist_oracle_and_random(shared_data, tmp_path, pneumonia_labels):
    task = get_task("pneumoniamnist", shared_data)
    word = {1: "Yes", 0: "No"}
    oracle = ScriptedModel(
        lambda c: f"Final Answer: {word[pneumonia_labels[pixel_key(_pneumonia_image(c))]]}", "oracle"
    )
    res = run_task(task, oracle, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=128)
    assert res["counts"]["n"] == 624 and res["counts"]["positives"] == 390
    assert res["metrics"]["macro_f1"]["value"] == 1.0
    assert res["metrics"]["accuracy"]["value"] == 1.0

    rand = RandomModel(["Yes", "No"], "Final Answer: {}", seed=3)
    res = run_task(task, rand, out_dir=tmp_path, n_boot=N_BOOT, progress=False, batch_size=128)
    assert abs(res["metrics"]["accuracy"]["value"] - 0.5) < 0.07
    assert abs(res["metrics"]["macro_f1"]["value"] - 0.5) < 0.07
