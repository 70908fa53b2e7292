"""Training losses. Each returns a *sum* and the count it should be divided by, so that gradient accumulation
and data parallelism divide once by the count over the whole optimizer step (a token-mean over the global
batch, whatever the micro-batching).

- `sigmoid_loss`: SigLIP, `labels = 2I - 1`, `-sum(logsigmoid(labels * logits)) / B`; with `chunk_size` the
  B x B logits are never held at once (`_ChunkedSigmoidLoss` recomputes each block in backward).
- `causal_lm_loss`: next-token cross-entropy from hidden states, computing the vocabulary projection only
  at positions that carry a label (answer tokens), in fp32.
- `sparse_distill_loss`: cross-entropy on a stored subset of the teacher distribution (indices, probabilities).
- `grpo_loss`: the clipped policy-gradient objective with group-normalised advantages and an optional KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors (losses are computed in fp32); fp32 / fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------- SigLIP


def siglip_logits(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor):
    """[N_img, N_txt] logits of L2-normalised embeddings."""
    return img @ txt.t() * logit_scale.exp() + logit_bias


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                 positive_offset: int = 0, normalizer: int | None = None, chunk_size: int = 0,
                 positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's loss for normalised image embeddings img [B, D] and text embeddings txt [M, D].

    Image i's positive text is txt[i + positive_offset] (0 when both hold the same batch; a rank's offset when
    txt gathers every rank's texts); every other pair is a negative, unless `positives` (bool [B, M]) marks
    more pairs as positive (the same caption given to several images). Returns -sum(logsigmoid(z * logits)) /
    normalizer (default B). `chunk_size > 0` gives the same value and gradients block by block.
    """
    norm = normalizer or img.shape[0]
    if positives is None:
        positives = torch.zeros(img.shape[0], txt.shape[0], dtype=torch.bool, device=img.device)
    positives = positives.clone()
    idx = torch.arange(img.shape[0], device=img.device)
    positives[idx, idx + positive_offset] = True
    if chunk_size and chunk_size < txt.shape[0]:
        return _ChunkedSigmoidLoss.apply(img, txt, logit_scale, logit_bias, positives, chunk_size) / norm
    logits = siglip_logits(img, txt, logit_scale, logit_bias)
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / norm


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """Sum of -logsigmoid(z * logits) over blocks of `chunk` texts; backward recomputes each block.

    d/dlogits = -z * sigmoid(-z * logits); logits = s * img @ txt.T + b with s = exp(logit_scale), so
    d img = s * G @ txt, d txt = s * G.T @ img, d logit_scale = sum(G * (logits - b)), d b = sum(G).
    """

    @staticmethod
    def _block(img, txt, scale, bias, j0, j1, positives):
        logits = img @ txt[j0:j1].t() * scale + bias
        return logits, positives[:, j0:j1].to(logits.dtype) * 2 - 1

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, positives, chunk):
        ctx.save_for_backward(img, txt, logit_scale, logit_bias, positives)
        ctx.chunk = chunk
        scale = logit_scale.exp()
        total = img.new_zeros(())
        for j0 in range(0, txt.shape[0], chunk):
            logits, z = _ChunkedSigmoidLoss._block(img, txt, scale, logit_bias, j0, min(j0 + chunk, txt.shape[0]), positives)
            total = total - F.logsigmoid(z * logits).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        img, txt, logit_scale, logit_bias, positives = ctx.saved_tensors
        scale = logit_scale.exp()
        d_img = torch.zeros_like(img)
        d_txt = torch.zeros_like(txt)
        d_scale = logit_scale.new_zeros(())
        d_bias = logit_bias.new_zeros(())
        for j0 in range(0, txt.shape[0], ctx.chunk):
            j1 = min(j0 + ctx.chunk, txt.shape[0])
            logits, z = _ChunkedSigmoidLoss._block(img, txt, scale, logit_bias, j0, j1, positives)
            g = -z * torch.sigmoid(-z * logits) * grad
            d_img += scale * g @ txt[j0:j1]
            d_txt[j0:j1] = scale * g.t() @ img
            d_scale += (g * (logits - logit_bias)).sum()
            d_bias += g.sum()
        return d_img, d_txt, d_scale.reshape(logit_scale.shape), d_bias.reshape(logit_bias.shape), None, None


# ----------------------------------------------------------------------------- language modelling


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the positions that predict them: out[:, t] = labels[:, t + 1], -100 at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def causal_lm_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192):
    """(sum of next-token cross-entropy, number of targets) from normed hidden states [B, T, H].

    Only positions whose next token carries a label are projected onto the vocabulary (the tied embedding
    `lm_weight` [V, H]); logits are upcast to fp32. Above `chunk_tokens` selected positions, blocks are
    checkpointed so that at most one block's [n, V] logits is held at a time.
    """
    targets = shift_labels(labels)
    keep = targets != IGNORE
    h = hidden[keep]
    y = targets[keep]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    if h.shape[0] <= chunk_tokens:
        return _ce_sum(h, lm_weight, y), int(y.numel())
    total = 0.0
    for i in range(0, h.shape[0], chunk_tokens):
        total = total + torch.utils.checkpoint.checkpoint(
            _ce_sum, h[i : i + chunk_tokens], lm_weight, y[i : i + chunk_tokens], use_reentrant=False
        )
    return total, int(y.numel())


def _ce_sum(h, w, y):
    return F.cross_entropy(upcast(F.linear(h, w)), y, reduction="sum")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits (fp32), same leading shape as tokens."""
    return torch.log_softmax(upcast(logits), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- distillation


def sparse_distill_loss(student_logits: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor,
                        renormalize: bool = True) -> torch.Tensor:
    """Sum over positions of -sum_j w_j log q(indices_j): cross-entropy against the stored teacher subset.

    student_logits [N, V]; indices [N, k] (long); probs [N, k] the teacher's probabilities of those indices
    (0 for unused slots). With `renormalize`, w = probs / sum(probs) per position, so the weights are a
    distribution over the stored subset; with k = V this is exactly the full-distribution cross-entropy
    H(p, q) = KL(p || q) + H(p), whose gradient is KL's.
    """
    logq = torch.log_softmax(upcast(student_logits), dim=-1).gather(-1, indices.long())
    w = probs.to(logq.dtype)
    if renormalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return -(w * logq).sum()


# ----------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), groups of `group_size` consecutive rewards.
    A group whose rewards are all equal gets advantage 0 (it carries no learning signal)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(mean)
    return ((r - mean) / (std + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              agg: str = "sequence"):
    """(loss sum, count, stats) of GRPO's objective on completion tokens.

    logp / old_logp / ref_logp [N, T]: log-probs of the sampled tokens under the policy being trained, the
    policy that sampled them and the reference; advantages [N]; mask [N, T] marks completion tokens.
    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL, with the k3 estimator
    KL = exp(ref - logp) - (ref - logp) - 1. agg="sequence" averages tokens within each completion and sums
    over completions (count = completions); agg="token" sums over all tokens (count = tokens).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = None
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    if agg == "sequence":
        lengths = mask.sum(-1).clamp_min(1)
        loss = ((per_token * mask).sum(-1) / lengths).sum()
        count = int((mask.sum(-1) > 0).sum())
    elif agg == "token":
        loss = (per_token * mask).sum()
        count = int(mask.sum())
    else:
        raise ValueError(f"agg must be 'sequence' or 'token', got {agg!r}")
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype)
        stats = {"clip_frac": float((clipped * mask).sum() / n)}
        if kl is not None:
            stats["kl"] = float((kl * mask).sum() / n)
    return loss, count, stats
