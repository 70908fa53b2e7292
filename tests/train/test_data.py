"""Dataset readers on the official files in the shared data folder, the user JSONL format, and the mixture."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from openmedgemma.eval.prompts import cxr_prompt
from openmedgemma.errors import DataError
from openmedgemma.train import data as D


def test_vqa_rad_official_and_balanced_splits(shared_data):
    root = shared_data / "vqa_rad"
    assert len(D.vqa_rad(root, "train", "official")) == 1797
    assert len(D.vqa_rad(root, "test", "official")) == 451
    splits = {s: D.vqa_rad(root, s, "balanced") for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 785, "validation": 728, "test": 735}
    images = {s: {ex.images[0] for ex in v} for s, v in splits.items()}
    assert not images["train"] & images["validation"] and not images["train"] & images["test"]
    assert not images["validation"] & images["test"]
    all_types = {ex.meta["answer_type"] for v in splits.values() for ex in v}
    assert all_types == {"OPEN", "CLOSED"}  # the two "CLOSED " values are stripped
    ex = splits["train"][0]
    assert " " in ex.images[0] and ex.images[0].endswith(".jpg")  # the folder name has spaces
    assert ex.prompt.endswith(ex.meta["question"]) and ex.answer == ex.answer.strip()
    with pytest.raises(DataError, match="balanced split 'dev' does not exist; use one of test, train, validation"):
        D.vqa_rad(root, "dev")


def test_captions_from_vqa_rad_qa_pairs(shared_data):
    qa = D.vqa_rad(shared_data / "vqa_rad", "train", "balanced")
    captions = D.captions_from_qa(qa)
    assert len(captions) == 109  # one per image of the balanced train split
    assert sum(c.meta["pairs"] for c in captions) == len(qa)
    first = captions[0]
    pairs = [ex for ex in qa if ex.images == first.images]
    for ex in pairs:
        assert f"{ex.meta['question']} {ex.answer.rstrip('.')}." in first.answer
    assert first.answer.startswith(("Head image.", "Chest image.", "Abd image."))


def test_pneumonia_mnist(shared_data):
    train = D.pneumonia_mnist(shared_data / "medmnist", "train")
    test = D.pneumonia_mnist(shared_data / "medmnist", "test")
    assert len(train) == 3882 and len(D.pneumonia_mnist(shared_data / "medmnist", "val")) == 524
    assert Counter(ex.answer for ex in test) == {"Final Answer: no": 234, "Final Answer: yes": 390}
    assert test[0].prompt == cxr_prompt("pneumonia")  # the evaluation's question, verbatim
    assert train[0].images[0].shape == (28, 28) and train[0].images[0].dtype == np.uint8
    captions = D.pneumonia_mnist(shared_data / "medmnist", "test", "caption")
    assert sum(ex.answer in D.PNEUMONIA_CAPTIONS[1] for ex in captions) == 390
    assert {ex.answer for ex in captions} == set(D.PNEUMONIA_CAPTIONS[0] + D.PNEUMONIA_CAPTIONS[1])
    assert {ex.meta["caption_group"] for ex in captions} == {"pneumonia:0", "pneumonia:1"}


def test_mcq_jsonl_csv_and_pubmedqa(shared_data):
    medqa = D.mcq(shared_data / "text_mcqa" / "medqa" / "test.jsonl")
    assert len(medqa) == 1273
    first = json.loads((shared_data / "text_mcqa" / "medqa" / "test.jsonl").read_text().splitlines()[0])
    assert medqa[0].answer == f"Final Answer: ({first['answer_idx']})"
    assert f"({first['answer_idx']}) {first['options'][first['answer_idx']]}" in medqa[0].prompt
    assert len(D.mcq(shared_data / "text_mcqa" / "mmlu", "test")) == 1089  # folder with test.jsonl
    csv_test = D.mcq(shared_data / "mmlu_medical_csv", "test")
    assert len(csv_test) == 1089 and len(D.mcq(shared_data / "mmlu_medical_csv", "dev")) == 30
    anatomy = [ex for ex in D.mcq(shared_data / "mmlu_medical_csv", "dev") if ex.source == "mcq:anatomy_dev"][0]
    assert "What is the embryological origin of the hyoid bone?" in anatomy.prompt
    assert anatomy.meta["answer_letter"] == "D"  # hyoid bone: "The second and third pharyngeal arches", index 3
    assert "from the four options" in anatomy.prompt
    pubmed_train, pubmed_test = D.pubmedqa(shared_data / "pubmedqa", "train"), D.pubmedqa(shared_data / "pubmedqa", "test")
    assert len(pubmed_train) == len(pubmed_test) == 500
    assert {ex.meta["answer_letter"] for ex in pubmed_test} == {"A", "B", "C"}
    assert "Context:" in pubmed_test[0].prompt and "from the three options" in pubmed_test[0].prompt


def test_user_image_text_jsonl(tmp_path):
    folder = tmp_path / "my data"
    (folder / "img dir").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(folder / "img dir" / "a b.png")
    lines = [{"image": "img dir/a b.png", "text": "A grey square."},
             {"image": str(folder / "img dir" / "a b.png"), "text": "Same image, absolute path."}]  # fmt: skip
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    examples = D.image_text(folder)
    assert [ex.answer for ex in examples] == ["A grey square.", "Same image, absolute path."]
    assert examples[0].images == (str(folder / "img dir" / "a b.png"),)
    (folder / "pairs.jsonl").write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: image 'missing.png' not found"):
        D.image_text(folder / "pairs.jsonl")
    (folder / "pairs.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: not a JSON line"):
        D.image_text(folder / "pairs.jsonl")


def test_missing_and_malformed_files_name_the_file(tmp_path, shared_data):
    with pytest.raises(DataError, match=r"nowhere: no such file or folder \(data source kind 'vqa_rad'\)"):
        D.load_source("vqa_rad", tmp_path / "nowhere")
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a\n")
    with pytest.raises(DataError, match=r"bad.csv: expected the header question,choice0"):
        D.mcq(bad)
    with pytest.raises(DataError, match=r"split 'nope' not found; it holds test, train, val"):
        D.pneumonia_mnist(shared_data / "medmnist", "nope")


def test_mixture_sampler_proportions_coverage_and_resume():
    sampler = D.MixtureSampler([10, 200], [1.0, 3.0], seed=7)
    draws = sampler.take(400)
    counts = Counter(s for s, _ in draws)
    assert counts == {0: 100, 1: 300}  # exact shares
    firsts = [i for s, i in draws if s == 0][:10]
    assert sorted(firsts) == list(range(10))  # an epoch visits every example once
    assert firsts != list(range(10))  # shuffled
    again = D.MixtureSampler([10, 200], [1.0, 3.0], seed=7).take(400)
    assert again == draws  # deterministic under the seed
    assert D.MixtureSampler([10, 200], [1.0, 3.0], seed=8).take(400) != draws
    resumed = D.MixtureSampler([10, 200], [1.0, 3.0], seed=7)
    resumed.take(123)
    state = resumed.state_dict()
    fresh = D.MixtureSampler([10, 200], [1.0, 3.0], seed=7)
    fresh.load_state_dict(state)
    assert fresh.take(277) == draws[123:]
    with pytest.raises(DataError, match="the data mixture changed since the checkpoint"):
        D.MixtureSampler([11, 200], [1.0, 3.0], seed=7).load_state_dict(state)


def test_vqa_rad_dialogues_chain_each_images_questions_once(shared_data):
    single = D.vqa_rad(shared_data / "vqa_rad", "train", "balanced")
    dialogues = D.load_source("vqa_rad", shared_data / "vqa_rad", "train", "dialogue")
    assert len(dialogues) == 322 and max(len(d.followups) for d in dialogues) == 2  # at most 3 questions
    by_qid = {ex.meta["qid"]: ex for ex in single}
    qids = [q for d in dialogues for q in d.meta["qids"]]
    assert sorted(qids) == sorted(by_qid)  # every training QA pair exactly once
    for d in dialogues:
        chain = [by_qid[q] for q in d.meta["qids"]]
        assert {ex.images for ex in chain} == {d.images}  # one image per dialogue
        assert len({ex.meta["linked"] for ex in chain}) == len(chain)  # never two paraphrases together
        assert (d.prompt, d.answer) == (chain[0].prompt, chain[0].answer)  # turn 1: the report's VQA prompt
        assert d.followups == tuple((ex.meta["question"], ex.answer) for ex in chain[1:])  # then bare questions
    assert set(dialogues[0].texts()) >= {dialogues[0].prompt, dialogues[0].answer}


def test_dialogue_format_is_for_vqa_rad_in_sft_only(tmp_path):
    from openmedgemma.errors import ConfigError
    from openmedgemma.train.config import config_from_dict

    source = {"kind": "vqa_rad", "path": "vqa_rad", "format": "dialogue"}
    config_from_dict({"stage": "sft", "model": {"config": "nano"}, "data": {"sources": [source]}})
    for stage, src in (("rl", source), ("pretrain", source), ("sft", {**source, "kind": "pubmedqa"})):
        with pytest.raises(ConfigError, match="dialogue"):
            config_from_dict({"stage": stage, "model": {"config": "nano"}, "data": {"sources": [src]}})
