"""Rollouts for RL: sampling completions from the policy.

A rollout function takes (prompts: list of token-id lists, pixel_values: one [n_i, 3, S, S] tensor or None
per prompt, n: completions per prompt) and returns len(prompts) * n completions (token ids, the stop token
included when one was sampled), grouped by prompt: prompt 0's n completions first.

`sample_completions` is the trainer's own sampler: it recomputes the whole sequence at each new token (no KV
cache), which keeps it exact and usable under FSDP (every rank runs the same number of forwards) but makes it
slow for long completions; `engine_rollout` uses the engine's cached `generate_ids`. Both sample with the
engine's `next_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from openmedgemma.engine.sampling import GenerationConfig, next_tokens

RolloutFn = Callable[[Sequence[Sequence[int]], Sequence, int], list[list[int]]]


@torch.no_grad()
def sample_completions(
    forward_logits: Callable,
    prompts: Sequence[Sequence[int]],
    pixel_values: Sequence[torch.Tensor | None],
    n: int,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    device: torch.device | str = "cpu",
    early_stop: bool = True,
    suppress_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample n completions per prompt. forward_logits(input_ids, attention_mask, pixel_values) returns the
    last position's logits [B, V]. Prompts are left padded; rows that stopped are fed padding. `suppress_ids`
    are never sampled (image soft tokens and image markers: a sampled soft token would need an image)."""
    rows = [list(p) for p in prompts for _ in range(n)]
    pixels = [pv for pv in pixel_values for _ in range(n)]
    images = [pv for pv in pixels if pv is not None]
    pv = torch.cat(images).to(device) if images else None
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    suppress = sorted(set(suppress_ids))
    out: list[list[int]] = [[] for _ in rows]
    config = GenerationConfig(temperature=temperature, top_k=top_k or None)
    for _ in range(max_new_tokens):
        logits = forward_logits(ids, mask, pv).float()
        if suppress:
            logits[:, suppress] = float("-inf")
        token = next_tokens(logits, config, generator)  # the engine's sampler: same draws as generate_ids
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(token[i]))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        done = done | torch.isin(token, stops)
        if early_stop and bool(done.all()):
            break
    return out


def engine_rollout(model, *, max_new_tokens: int, temperature: float, top_k: int, stop_ids,
                   suppress_ids: Sequence[int] = ()) -> RolloutFn:
    """A rollout function over the engine's `generate_ids` (KV cache). Sampling draws from torch's global RNG
    (saved in checkpoints). The engine's fused matmuls cover plain linear layers only; adapters and quantized
    layers run through their own modules (engine/fast.py checks on every call). A completion is cut before any id of
    `suppress_ids` (an image soft token cannot be part of a completion)."""
    from openmedgemma.engine.fast import DecoderRunner
    from openmedgemma.engine.generate import generate_ids

    fast = DecoderRunner(model.language_model)  # one for every call: its kernels see weight updates
    suppress = set(suppress_ids)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None)

    def rollout(prompts, pixel_values, n):
        rows = [list(p) for p in prompts for _ in range(n)]
        images = [pv for pv in pixel_values for _ in range(n)]
        out = []
        for completion in generate_ids(model, rows, images, cfg, list(stop_ids), fast=fast):
            cut = next((i for i, t in enumerate(completion) if t in suppress), len(completion))
            out.append(list(completion[:cut]))
        return out

    return rollout
