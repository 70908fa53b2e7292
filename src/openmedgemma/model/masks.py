"""Attention masks for the Gemma 3 decoder (boolean, True = may attend).

Text is causal; sliding layers also limit a query to the `window` most recent keys (itself
included). The soft tokens of one image see each other in both directions, on both layer types,
as transformers does when the processor's token_type_ids are given.
"""

from __future__ import annotations

import torch

from openmedgemma.config import FULL, SLIDING


def image_block_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per position: the index of the image whose soft tokens it belongs to, else -1.

    Each maximal run of consecutive image soft tokens is one image.
    """
    is_image = input_ids == image_token_id
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def decoder_masks(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sliding_window: int,
    q_block: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    kinds: tuple[str, ...] = (FULL, SLIDING),
) -> dict[str, torch.Tensor]:
    """Masks [B, 1, Tq, Tk] for full and sliding layers (only those in `kinds`).

    q_pos [B, Tq] and k_pos [B, Tk] are absolute positions; q_block/k_block are image block ids
    (-1 for text); k_valid [B, Tk] marks real (non-padding, filled) keys.
    """
    # boolean comparisons only: an int64 [B, Tq, Tk] difference would cost 8 bytes per query-key pair
    # (512 MB for a 2048-token chunk over a 32k-token prompt)
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    causal = k <= q  # key at or before the query
    if q_block is not None and k_block is not None:
        same_image = (q_block[:, :, None] >= 0) & (q_block[:, :, None] == k_block[:, None, :])
        causal = causal | same_image
    if k_valid is not None:
        causal = causal & k_valid[:, None, :]
    masks = {}
    if FULL in kinds:
        masks[FULL] = causal[:, None]
    if SLIDING in kinds:
        masks[SLIDING] = (causal & (k > q - sliding_window))[:, None]  # q - k < window
    return masks
