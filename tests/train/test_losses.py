"""Losses against their plain definitions: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openmedgemma.train.distill import select_teacher_targets
from openmedgemma.train.losses import (
    causal_lm_loss,
    group_advantages,
    grpo_loss,
    sigmoid_loss,
    sparse_distill_loss,
)

G = torch.Generator().manual_seed(0)


def unit(*shape):
    return F.normalize(torch.randn(*shape, generator=G, dtype=torch.float64), dim=-1)


def siglip_reference(img, txt, scale, bias):
    """The spec's definition: labels = 2I - 1, -sum(logsigmoid(labels * logits)) / B."""
    logits = img @ txt.t() * scale.exp() + bias
    labels = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 10])
def test_sigmoid_loss_full_and_chunked_equal_the_definition_with_gradients(chunk):
    img, txt = unit(10, 6), unit(10, 6)
    scale, bias = torch.tensor([2.3], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)
    ref_in, our_in = leaves(img, txt, scale, bias), leaves(img, txt, scale, bias)
    ref = siglip_reference(*ref_in)
    ours = sigmoid_loss(*our_in, chunk_size=chunk)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(our_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [0, 4])
def test_sigmoid_loss_against_gathered_texts_sums_to_the_global_loss(chunk):
    """Two 'ranks' each score their 5 images against all 10 texts: the parts sum to the 10-pair loss."""
    img, txt = unit(10, 6), unit(10, 6)
    scale, bias = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    full = siglip_reference(img, txt, scale, bias)
    parts = [sigmoid_loss(img[r * 5 : (r + 1) * 5], txt, scale, bias, positive_offset=r * 5, normalizer=10,
                          chunk_size=chunk) for r in range(2)]  # fmt: skip
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [0, 3])
def test_sigmoid_loss_counts_a_repeated_caption_as_positive_for_each_of_its_images(chunk):
    """Images 0, 2 and 5 share one caption: every pair among them is positive, as the definition with the
    label matrix 2 * same_caption - 1 says."""
    img, txt = unit(6, 4), unit(6, 4)
    txt[2] = txt[0]
    txt[5] = txt[0]
    caption = torch.tensor([0, 1, 0, 2, 3, 0])
    same = caption[:, None] == caption[None, :]
    scale, bias = torch.tensor([1.5], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    ref_in, our_in = leaves(img, txt, scale, bias), leaves(img, txt, scale, bias)
    ref = -F.logsigmoid((same.double() * 2 - 1) * (ref_in[0] @ ref_in[1].t() * ref_in[2].exp() + ref_in[3])).sum() / 6
    ours = sigmoid_loss(*our_in, chunk_size=chunk, positives=same)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(our_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    plain = sigmoid_loss(img, txt, scale, bias)
    assert not torch.allclose(plain, ours)  # without the mask, the shared caption would count as negatives


def test_causal_lm_loss_projects_only_labelled_positions_and_matches_full_cross_entropy():
    hidden = torch.randn(3, 9, 16, generator=G, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=G, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 9), generator=G)
    labels[:, :4] = -100
    labels[2, 6:] = -100
    for chunk in (1000, 2):
        h, w = leaves(hidden, weight)
        loss, count = causal_lm_loss(h, w, labels, chunk_tokens=chunk)
        h2, w2 = leaves(hidden, weight)
        logits = (h2 @ w2.t())[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        assert count == int((labels[:, 1:] != -100).sum())
        (loss / count).backward()
        (ref / count).backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(h.grad, h2.grad)
        torch.testing.assert_close(w.grad, w2.grad)


def test_sparse_distill_with_all_ids_is_the_full_cross_entropy_and_has_the_kl_gradient():
    v = 40
    teacher = torch.randn(6, v, generator=G, dtype=torch.float64) * 3
    student = torch.randn(6, v, generator=G, dtype=torch.float64)
    for selection in ("topk", "sample"):
        idx, p = select_teacher_targets(teacher, k=v, selection=selection, generator=torch.Generator().manual_seed(1))
        assert sorted(idx[0].tolist()) == list(range(v))  # every id, each once
        (s1,) = leaves(student)
        ours = sparse_distill_loss(s1, idx, p)
        pt = torch.softmax(teacher, -1)
        full_ce = -(pt * torch.log_softmax(student, -1)).sum()
        kl = F.kl_div(torch.log_softmax(student, -1), pt, reduction="sum")
        entropy = -(pt * pt.log()).sum()
        torch.testing.assert_close(ours, full_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, kl + entropy, rtol=1e-12, atol=1e-12)
        (s2,) = leaves(student)
        F.kl_div(torch.log_softmax(s2, -1), pt, reduction="sum").backward()
        ours.backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_teacher_target_selection():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -9.0]])
    idx, p = select_teacher_targets(logits, k=2, selection="topk")
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(p, torch.softmax(logits, -1)[:, :2])
    # sampling: distinct ids, each with the teacher's own probability; frequent ids are drawn more often
    counts = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx, p = select_teacher_targets(logits, k=2, selection="sample", generator=g)
        assert idx[0, 0] != idx[0, 1]
        torch.testing.assert_close(p, torch.softmax(logits, -1).gather(-1, idx))
        counts[idx[0]] += 1
    assert counts[0] > counts[2] > counts[4]


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    torch.testing.assert_close(a[:4].mean(), torch.tensor(0.0))
    torch.testing.assert_close(a[:4].std(unbiased=False), torch.tensor(1.0), atol=1e-3, rtol=0)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: no signal


def test_grpo_loss_gradient_clipping_kl_and_aggregation():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.4, 0.4]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, count, _ = grpo_loss(logp, logp.detach(), adv, mask, agg="sequence")
    loss.backward()
    # ratio 1: d loss / d logp = -A / completion length on completion tokens, 0 elsewhere
    expected = torch.tensor([[-1.0, -1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)
    assert count == 2
    _, count_tokens, _ = grpo_loss(logp, logp.detach(), adv, mask, agg="token")
    assert count_tokens == 5
    # a ratio already above 1 + eps with a positive advantage is clipped: no gradient
    new = (logp.detach() + 0.5).requires_grad_(True)
    loss, _, stats = grpo_loss(new, logp.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64), mask, clip_eps=0.2)
    loss.backward()
    assert torch.equal(new.grad, torch.zeros_like(new.grad)) and stats["clip_frac"] == 1.0
    # KL (k3) to the reference: zero at the reference, positive away from it
    _, _, stats = grpo_loss(logp.detach(), logp.detach(), adv, mask, ref_logp=logp.detach(), kl_coef=0.1)
    assert stats["kl"] == 0.0
    _, _, stats = grpo_loss(logp.detach(), logp.detach(), adv, mask, ref_logp=logp.detach() - 0.3, kl_coef=0.1)
    assert stats["kl"] > 0


def test_grpo_kl_is_the_k3_estimator_of_kl_policy_to_reference():
    """k3 (Schulman 2020) for tokens sampled from the policy pi: r = ref / pi, k3 = r - 1 - log r, whose mean under
    pi is KL(pi || ref) exactly. Hand-computed values, then the expectation over a whole distribution."""
    pi = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    ref = torch.tensor([[0.125, 0.625, 0.25]], dtype=torch.float64)
    logp, ref_logp = pi.log(), ref.log()
    zero = torch.zeros(1, dtype=torch.float64)
    mask = torch.ones(1, 3)
    loss, count, stats = grpo_loss(logp, logp, zero, mask, ref_logp=ref_logp, kl_coef=1.0, agg="token")
    # per token: r = 1/4 -> 1/4 - 1 + ln 4; r = 5/2 -> 5/2 - 1 - ln 5/2; r = 1 -> 0 (advantages 0: the loss is the KL)
    per_token = [0.25 - 1 + 1.3862943611198906, 2.5 - 1 - 0.9162907318741551, 0.0]
    assert count == 3
    assert loss.item() == pytest.approx(sum(per_token), abs=1e-12)
    assert stats["kl"] == pytest.approx(sum(per_token) / 3, abs=1e-12)
    # weighted by pi (the sampling distribution), k3 averages to KL(pi || ref), not KL(ref || pi)
    _, _, weighted = grpo_loss(logp, logp, zero, mask * pi.float(), ref_logp=ref_logp, kl_coef=1.0, agg="token")
    kl_pi_ref = float((pi * (pi / ref).log()).sum())
    kl_ref_pi = float((ref * (ref / pi).log()).sum())
    assert weighted["kl"] == pytest.approx(kl_pi_ref, abs=1e-6) and abs(kl_pi_ref - kl_ref_pi) > 0.01
    # kl_coef scales the term; its gradient with respect to log pi is 1 - r (pushes pi toward ref)
    live = logp.clone().requires_grad_(True)
    loss, _, _ = grpo_loss(live, logp, zero, mask, ref_logp=ref_logp, kl_coef=0.5, agg="token")
    loss.backward()
    torch.testing.assert_close(live.grad, 0.5 * (1 - ref / pi))
