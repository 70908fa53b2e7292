"""Chat formatting and label masking on real examples: which positions carry a label."""

from __future__ import annotations

import numpy as np
import torch

from openmedgemma.train.collate import IGNORE, LMCollator
from openmedgemma.train.data import Example, vqa_rad
from tests import tiny


def collator(tok, **kw):
    kw = {"image_seq_length": tiny.TOKENS_PER_IMAGE, "image_size": tiny.IMAGE_SIZE, "max_length": 512, **kw}
    return LMCollator(tok, **kw)


def test_labels_cover_exactly_the_answer_and_end_of_turn_on_a_real_vqa_rad_example(tok, shared_data):
    examples = vqa_rad(shared_data / "vqa_rad", "train", "balanced")
    ex = next(e for e in examples if e.meta["answer_type"] == "OPEN" and len(e.answer.split()) > 1)
    short = next(e for e in examples if len(e.answer.split()) == 1)
    batch = collator(tok)([ex, short])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n0 = int(mask[0].sum())
    row_ids, row_labels = ids[0, :n0].tolist(), labels[0, :n0].tolist()

    # the sequence is exactly the chat template of the conversation (user: image + prompt; model: answer)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]},
                    {"role": "assistant", "content": ex.answer}]  # fmt: skip
    assert row_ids == tok.encode_chat(conversation, add_generation_prompt=False, image_seq_length=tiny.TOKENS_PER_IMAGE)

    labelled = [i for i, y in enumerate(row_labels) if y != IGNORE]
    prompt_len = len(tok.encode_chat(conversation[:1], add_generation_prompt=True, image_seq_length=tiny.TOKENS_PER_IMAGE))
    assert labelled == list(range(prompt_len, len(row_ids) - 1))  # contiguous: the model turn, final "\n" excluded
    assert [row_ids[i] for i in labelled] == row_labels[prompt_len : len(row_ids) - 1]
    assert tok.decode([row_ids[i] for i in labelled], skip_special_tokens=False) == ex.answer + "<end_of_turn>"
    for special in (tok.image_token_id, tok.boi_id, tok.eoi_id, tok.bos_id, tok.start_of_turn_id):
        positions = [i for i, t in enumerate(row_ids) if t == special]
        assert positions and all(row_labels[i] == IGNORE for i in positions)
    assert row_ids.count(tok.image_token_id) == tiny.TOKENS_PER_IMAGE
    assert row_labels[len(row_ids) - 1] == IGNORE and row_ids[-1] == tok.encode("\n")[0]

    # right padding of the shorter row: pad ids, mask 0, no labels
    shorter = int(mask.sum(1).argmin())
    n = int(mask[shorter].sum())
    assert n < ids.shape[1] and mask[shorter, :n].all() and not mask[shorter, n:].any()
    assert (ids[shorter, n:] == tok.pad_id).all() and (labels[shorter, n:] == IGNORE).all()
    assert tok.decode([t for t, y in zip(ids[1].tolist(), labels[1].tolist()) if y != IGNORE],
                      skip_special_tokens=False) == short.answer + "<end_of_turn>"  # fmt: skip
    assert batch["pixel_values"].shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    assert batch["n_tokens"] == int(mask.sum())


def test_plain_mode_labels_the_text_and_eos(tok):
    image = np.zeros((8, 8), np.uint8)
    batch = collator(tok, mode="plain")([Example(answer="Chest image. Is there effusion? yes.", images=(image,))])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[0] == tok.bos_id and ids.count(tok.image_token_id) == tiny.TOKENS_PER_IMAGE
    text = [t for t, y in zip(ids, labels) if y != IGNORE]
    assert text == tok.encode("Chest image. Is there effusion? yes.") + [tok.eos_id]
    assert labels[: ids.index(tok.eoi_id) + 1] == [IGNORE] * (ids.index(tok.eoi_id) + 1)


def test_truncation_never_splits_an_image(tok):
    image = np.zeros((8, 8), np.uint8)
    ex = Example(prompt="Compare the two images.", answer="They differ.", images=(image, image))
    full = collator(tok).encode(ex)
    second_boi = [i for i, t in enumerate(full.input_ids) if t == tok.boi_id][1]
    cut = collator(tok, max_length=second_boi + 5)([ex])  # the cut falls inside the second image
    ids = cut["input_ids"][0].tolist()
    assert len(ids) <= second_boi and ids.count(tok.image_token_id) == tiny.TOKENS_PER_IMAGE
    assert cut["pixel_values"].shape[0] == 1  # one image kept, one dropped
    assert torch.equal(cut["labels"][0], torch.full((len(ids),), IGNORE))  # the answer was cut away


def test_siglip_pairs_are_tokenized_as_at_inference_and_grouped_by_class(siglip_dir, shared_data):
    from openmedgemma.tokenizer import SiglipTextTokenizer
    from openmedgemma.train import data as D
    from openmedgemma.train.collate import SiglipCollator
    from openmedgemma.train.modeling import SiglipModule

    tok = SiglipTextTokenizer.from_pretrained(siglip_dir, max_length=32)
    pneumonia = D.pneumonia_mnist(shared_data / "medmnist", "test", "caption")[:12]
    vqa = D.captions_from_qa(D.vqa_rad(shared_data / "vqa_rad", "train"))[:2]
    examples = pneumonia + vqa + vqa[:1]
    batch = SiglipCollator(tok, image_size=28)(examples)
    assert torch.equal(batch["input_ids"], tok([ex.answer for ex in examples]))  # canonicalised, </s>, padded
    labels = [ex.meta["label"] for ex in pneumonia]
    g = batch["groups"].tolist()
    for i in range(12):
        for j in range(12):
            assert (g[i] == g[j]) == (labels[i] == labels[j])  # one class's different captions share a group
    assert g[12] != g[13] and g[14] == g[12] and g[12] not in g[:12]  # VQA-RAD: one group per caption

    from openmedgemma import MedSigLIP

    module = SiglipModule(MedSigLIP.from_pretrained(siglip_dir))
    with_groups = module(batch["input_ids"], batch["pixel_values"], groups=batch["groups"])[0]
    by_text = module(batch["input_ids"], batch["pixel_values"])[0]
    assert not torch.allclose(with_groups, by_text)  # class groups change the positives beyond identical captions


def test_a_vqa_rad_dialogue_is_the_chat_a_user_has_with_every_answer_labelled(tok, shared_data):
    from openmedgemma.train.data import load_source

    dialogues = load_source("vqa_rad", shared_data / "vqa_rad", "train", "dialogue")
    ex = next(d for d in dialogues if len(d.followups) == 2)
    row = collator(tok).encode(ex)
    # the conversation chat sends: image + VQA prompt, then each follow-up as the bare question
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]},
                {"role": "assistant", "content": ex.answer}]  # fmt: skip
    for question, answer in ex.followups:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert row.input_ids == tok.encode_chat(messages, add_generation_prompt=False, image_seq_length=tiny.TOKENS_PER_IMAGE)
    # every model turn is labelled (answer + <end_of_turn>), each starting right where generation would start
    starts = [len(tok.encode_chat(messages[: 2 * k + 1], image_seq_length=tiny.TOKENS_PER_IMAGE)) for k in range(3)]
    labelled = [i for i, y in enumerate(row.labels) if y != IGNORE]
    spans = []
    for i in labelled:
        if spans and spans[-1][-1] == i - 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    assert [s[0] for s in spans] == starts
    answers = [ex.answer] + [a for _, a in ex.followups]
    assert [tok.decode([row.input_ids[i] for i in s], skip_special_tokens=False) for s in spans] == [
        a.strip() + "<end_of_turn>" for a in answers
    ]
    assert row.input_ids.count(tok.image_token_id) == tiny.TOKENS_PER_IMAGE  # the image once, in turn 1
