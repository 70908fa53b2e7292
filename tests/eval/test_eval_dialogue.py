"""`vqa-rad-dialogue`: VQA-RAD questions about one image chained into a conversation, scored on the follow-ups."""

from __future__ import annotations

import json

from eval_scripted import ScriptedModel, conversation_images
from openmedgemma.eval import get_task, run_task
from openmedgemma.eval.prompts import vqa_prompt


def test_follow_up_turns_of_the_balanced_test_split(shared_data, tmp_path):
    task = get_task("vqa-rad-dialogue", shared_data)
    examples = task.load_examples()
    records = {str(r["qid"]): r for r in json.loads((shared_data / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())}
    assert task.data_info == {"dialogues": 218, "follow_up_turns": 428}
    assert {ex.meta["turn"] for ex in examples} == {2, 3}
    for ex in examples:
        messages, record = ex.messages, records[ex.id]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (ex.meta["turn"] - 1) + ["user"]
        [image] = conversation_images(messages)  # the image once, in the first turn, with the report's prompt
        assert image.endswith(record["image_name"]) and messages[0]["content"][1]["text"].startswith(vqa_prompt(""))
        assert messages[-1]["content"] == record["question"].strip() and ex.target == str(record["answer"]).strip()
        earlier = [records[q] for q in ex.meta["history"]]
        assert [m["content"] for m in messages[1::2]] == [str(r["answer"]).strip() for r in earlier]  # reference answers
        assert [m["content"] for m in messages[2:-1:2]] == [r["question"].strip() for r in earlier[1:]]
        assert all(r["image_name"] == record["image_name"] for r in earlier)
        assert all(r["qid_linked_id"] != record["qid_linked_id"] for r in earlier)  # no paraphrase gives it away

    answers = {(ex.messages[-1]["content"], len(ex.messages)): ex.target for ex in examples}
    oracle = ScriptedModel(lambda c: answers[(c[-1]["content"], len(c))], "oracle")
    res = run_task(task, oracle, out_dir=tmp_path, limit=60, n_boot=20, progress=False)
    assert res["metrics"]["token_f1"]["value"] == 1.0 and res["counts"]["n"] == 60
    echo = ScriptedModel(lambda c: "Finalinalinal Answerswers: yes", "degenerate")  # issue 16's second turn
    res = run_task(task, echo, out_dir=tmp_path, limit=60, n_boot=20, progress=False)
    assert res["metrics"]["token_f1"]["value"] < 0.2


def test_first_turn_bare_as_a_chat_user_asks(shared_data):
    report = get_task("vqa-rad-dialogue", shared_data).load_examples()
    bare = get_task("vqa-rad-dialogue", shared_data, first="bare").load_examples()
    assert [ex.id for ex in bare] == [ex.id for ex in report]
    assert [ex.messages[1:] for ex in bare] == [ex.messages[1:] for ex in report]
    for ex, ref in zip(bare, report):
        assert ex.messages[0]["content"][0] == ref.messages[0]["content"][0]  # the same image
        assert vqa_prompt(ex.messages[0]["content"][1]["text"]) == ref.messages[0]["content"][1]["text"]

