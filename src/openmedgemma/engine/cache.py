"""A preallocated KV cache for a batch of sequences sharing one time axis (left padded).

Global layers keep every time step: slot t holds time step t, `capacity` slots in all.
Sliding layers keep a ring of `ring = min(sliding_window, capacity)` slots: time step t lives in
slot t % ring, so their memory never grows with the context.

A chunk of T > 1 new tokens on a sliding layer attends over [ring contents, the T new keys] (a
copy), and only then are the newest min(T, ring) keys written into the ring: the chunk's early
queries still see keys the chunk overwrites. A single decode token writes first and attends over
the ring itself (no copy): the slot it overwrites held time step t - ring, already out of its window.

Each step, `begin(...)` decides the key layout and returns the boolean masks (True = attend,
[B, 1, T, keys]) that describe it; the decoder then calls `update(layer_idx, k, v)` per layer.

Speculative decoding (prompt lookup) feeds a multi-token step after decode steps, `reversible`, and
then `rollback`s the time steps of its rejected drafts. Global layers only forget them (the slots are
written again later). Sliding layers must also give back what those steps overwrote in the ring:
keys of older time steps that later windows still need. `begin(..., reversible=True)` therefore
saves the ring slots the step will overwrite (at most T <= ring per sliding layer) and `rollback`
copies the rejected ones back, so the ring is bit for bit what plain decoding leaves. (The other
way, a ring with slack slots beyond the window, would make every decode step need a window mask
and change the ring layout the compiled decode step and `SlotCache.load` rely on; a copy of T slots
per verify step costs far less.)
"""

from __future__ import annotations

import torch

from openmedgemma.config import FULL, SLIDING, GemmaTextConfig
from openmedgemma.model.masks import decoder_masks


class KVCache:
    def __init__(self, config: GemmaTextConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        self.window = config.sliding_window
        self.capacity = capacity
        self.ring = min(self.window, capacity)
        self.layer_types = config.layer_types
        n_kv, head_dim = config.num_key_value_heads, config.head_dim
        self.keys, self.values = [], []
        for kind in self.layer_types:
            slots = capacity if kind == FULL else self.ring
            self.keys.append(torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device))
            self.values.append(torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device))
        # what each slot holds: absolute position and whether it is a real (non-padding) token
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.ring_pos = torch.full((batch, self.ring), -1, dtype=torch.long, device=device)
        self.ring_valid = torch.zeros(batch, self.ring, dtype=torch.bool, device=device)
        self.length = 0  # time steps written
        self.padded = False  # some slot holds a padding token: decode steps need masks
        self._t0 = self._n = 0
        self._slots: torch.Tensor | None = None  # ring slots a chunk writes after attending; None: decode
        self._decoding = False
        # decode steps skip the pos / valid bookkeeping (it costs a few us per token): time steps
        # [_synced, length) were decode steps; a later multi-token step fills their entries in
        self._synced = 0
        # a reversible step's overwritten ring contents: layer -> (keys, values) of its slots; ring_pos /
        # ring_valid of those slots. None: the last step cannot be rolled back.
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._saved_ring: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def nbytes_for(config: GemmaTextConfig, batch: int, capacity: int, dtype: torch.dtype) -> int:
        """Bytes of keys + values this cache allocates (without allocating it)."""
        ring = min(config.sliding_window, capacity)
        itemsize = torch.tensor([], dtype=dtype).element_size()
        per_slot = 2 * batch * config.num_key_value_heads * config.head_dim * itemsize
        return sum(per_slot * (capacity if kind == FULL else ring) for kind in config.layer_types)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ steps

    def begin(self, q_pos: torch.Tensor, q_valid: torch.Tensor | None = None, q_block: torch.Tensor | None = None,
              padded: bool = False, *, reversible: bool = False) -> dict[str, torch.Tensor | None]:
        """Start a step of T new time steps; return the masks per layer type for its key layout.

        q_pos [B, T]: positions; q_valid [B, T]: False at left padding (`padded` must then be True);
        q_block [B, T]: image block ids of the chunk (-1 for text). Image blocks must lie whole in one step.
        reversible: `rollback` may then take back any tail of this step (T <= ring; see the module doc).
        After decode steps, a multi-token step assumes they advanced each row's position by one per
        time step (as generation does), so step s held position q_pos[:, 0] - (length - s).
        """
        b, t = q_pos.shape
        t0 = self.length
        if t0 + t > self.capacity:
            raise ValueError(f"KV cache full: {t0} + {t} time steps > capacity {self.capacity}")
        if reversible and t > self.ring:
            raise ValueError(f"a reversible step holds at most the {self.ring} ring slots, got {t} time steps")
        self._t0, self._n = t0, t
        self.length = t0 + t
        self._saved = self._saved_ring = None
        if t == 1 and q_block is None and not padded and not reversible:
            self._decoding = True
            return self._decode_masks(t0)
        if self._synced < t0:
            self._sync_decoded(q_pos[:, :1], t0)
        self._synced = t0 + t
        if q_valid is None:
            q_valid = torch.ones_like(q_pos, dtype=torch.bool)
        if q_block is None:
            q_block = torch.full_like(q_pos, -1)
        self.padded = self.padded or padded

        # global layers: keys are slots [0, t0 + t)
        self.pos[:, t0 : t0 + t] = q_pos
        self.valid[:, t0 : t0 + t] = q_valid
        old_block = torch.full((b, t0), -1, dtype=q_block.dtype, device=q_block.device)
        full = decoder_masks(q_pos, self.pos[:, : t0 + t], self.window, q_block, torch.cat([old_block, q_block], 1),
                             self.valid[:, : t0 + t], kinds=(FULL,))[FULL]  # fmt: skip
        # sliding layers: keys are [the n filled ring slots, the t new keys]
        n = min(t0, self.ring)
        k_pos = torch.cat([self.ring_pos[:, :n], q_pos], 1)
        k_valid = torch.cat([self.ring_valid[:, :n], q_valid], 1)
        sliding = decoder_masks(q_pos, k_pos, self.window, q_block, torch.cat([old_block[:, :n], q_block], 1),
                                k_valid, kinds=(SLIDING,))[SLIDING]  # fmt: skip
        if padded:  # a padding query sees nothing; let it see itself so SDPA stays finite
            pad_q = ~q_valid[:, None, :, None]
            full = full | (_shifted_eye(t, t0 + t, t0, q_pos.device) & pad_q)
            sliding = sliding | (_shifted_eye(t, n + t, n, q_pos.device) & pad_q)

        m = min(t, self.ring)
        self._slots = torch.arange(t0 + t - m, t0 + t, device=q_pos.device) % self.ring
        if reversible:  # m == t: slot i holds time step t0 + i
            self._saved = {}
            self._saved_ring = (self.ring_pos[:, self._slots], self.ring_valid[:, self._slots])
        self.ring_pos[:, self._slots] = q_pos[:, t - m :]
        self.ring_valid[:, self._slots] = q_valid[:, t - m :]
        return {FULL: full, SLIDING: sliding}

    def _sync_decoded(self, first_pos: torch.Tensor, t0: int) -> None:
        """Fill in pos / valid (and the ring's) for the decode steps [_synced, t0): real tokens at
        consecutive positions ending just before `first_pos` [B, 1], the next step's first position."""
        steps = torch.arange(self._synced, t0, device=first_pos.device)
        pos = first_pos - (t0 - steps)[None]
        self.pos[:, self._synced : t0] = pos
        self.valid[:, self._synced : t0] = True
        tail = max(self._synced, t0 - self.ring) - self._synced  # only the last `ring` steps are in the ring
        self.ring_pos[:, steps[tail:] % self.ring] = pos[:, tail:]
        self.ring_valid[:, steps[tail:] % self.ring] = True
        self._synced = t0

    def rollback(self, length: int) -> None:
        """Take back time steps [length, self.length) of the last step, which was begun `reversible`:
        afterwards the cache is what it would be had the step fed only its first `length - t0` tokens."""
        t0, t = self._t0, self._n
        if self._saved is None or not t0 <= length <= t0 + t:
            raise ValueError(f"can only roll back into the last step begun reversible (time steps {t0}..{t0 + t}), "
                             f"not to {length}")  # fmt: skip
        keep = length - t0
        if keep < t:
            self.pos[:, length : t0 + t] = -1
            self.valid[:, length : t0 + t] = False
            slots = self._slots[keep:]
            for idx, (k, v) in self._saved.items():
                self.keys[idx].index_copy_(2, slots, k[:, :, keep:])
                self.values[idx].index_copy_(2, slots, v[:, :, keep:])
            ring_pos, ring_valid = self._saved_ring
            self.ring_pos[:, slots] = ring_pos[:, keep:]
            self.ring_valid[:, slots] = ring_valid[:, keep:]
        self.length = self._synced = length
        self._n = keep
        self._saved = self._saved_ring = None

    def _decode_masks(self, t0: int) -> dict[str, torch.Tensor | None]:
        """One real token per row: it may see every filled slot but padding; no mask at all without padding."""
        self._slots = None
        slot = t0 % self.ring
        if not self.padded:
            return {FULL: None, SLIDING: None}
        self.valid[:, t0] = True
        self.ring_valid[:, slot] = True
        return {
            FULL: self.valid[:, None, None, : t0 + 1],
            SLIDING: self.ring_valid[:, None, None, : min(t0 + 1, self.ring)],
        }

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v ([B, n_kv, T, head_dim]) for the layer; return the keys/values to attend over."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        t0, t = self._t0, self._n
        if self.layer_types[layer_idx] == FULL:
            keys[:, :, t0 : t0 + t] = k
            values[:, :, t0 : t0 + t] = v
            return keys[:, :, : t0 + t], values[:, :, : t0 + t]
        if self._slots is None:  # decode: write first, attend over the ring itself
            slot = t0 % self.ring
            keys[:, :, slot : slot + 1] = k
            values[:, :, slot : slot + 1] = v
            n = min(t0 + 1, self.ring)
            return keys[:, :, :n], values[:, :, :n]
        n = min(t0, self.ring)
        out_k = torch.cat([keys[:, :, :n], k], 2) if n else k
        out_v = torch.cat([values[:, :, :n], v], 2) if n else v
        m = self._slots.numel()
        if self._saved is not None:  # reversible: keep what the step overwrites
            self._saved[layer_idx] = (keys.index_select(2, self._slots), values.index_select(2, self._slots))
        keys.index_copy_(2, self._slots, k[:, :, t - m :])
        values.index_copy_(2, self._slots, v[:, :, t - m :])
        return out_k, out_v


def _shifted_eye(rows: int, cols: int, offset: int, device) -> torch.Tensor:
    """[rows, cols] boolean with True at (i, offset + i)."""
    eye = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    i = torch.arange(rows, device=device)
    eye[i, offset + i] = True
    return eye


def grown(cache: KVCache, capacity: int) -> KVCache:
    """A batch-1, unpadded, prefill-only cache copied into a new one of `capacity` >= its length,
    which can go on prefilling (the prefix cache's snapshots are continued this way).

    The slot layout carries over: a global layer's step t is slot t in both, and a sliding layer's
    ring (min(window, capacity) slots) holds step t at t % ring; while fewer steps than the old ring
    were written, t < ring in both, else both rings are the full window.
    """
    if cache.padded or cache._decoding or cache.keys[0].shape[0] != 1:
        raise ValueError("only a batch-1, unpadded cache that has not decoded can be grown")
    n = cache.length
    if capacity < n:
        raise ValueError(f"capacity {capacity} < the {n} steps written")
    k0 = cache.keys[0]
    out = KVCache(_ConfigView(cache), 1, capacity, k0.dtype, k0.device)
    filled = min(n, cache.ring)
    for idx, kind in enumerate(cache.layer_types):
        m = n if kind == FULL else filled
        out.keys[idx][:, :, :m] = cache.keys[idx][:, :, :m]
        out.values[idx][:, :, :m] = cache.values[idx][:, :, :m]
    out.pos[:, :n], out.valid[:, :n] = cache.pos[:, :n], cache.valid[:, :n]
    out.ring_pos[:, :filled], out.ring_valid[:, :filled] = cache.ring_pos[:, :filled], cache.ring_valid[:, :filled]
    out.length = n
    return out


class _ConfigView:
    """The few config fields KVCache reads, taken from an existing cache."""

    def __init__(self, cache: KVCache):
        self.sliding_window, self.layer_types = cache.window, cache.layer_types
        self.num_key_value_heads, self.head_dim = cache.keys[0].shape[1], cache.keys[0].shape[3]


class SlotCache:
    """KV cache rows for continuous batching: each running sequence owns row r < `rows` with its own
    length. Rows [0, n) are the running batch (the scheduler keeps them packed: `move` fills a freed row
    with the last one), so a decode step works on views [:n], without gathers.

    Row r holds its sequence's time step t (= its position: no padding) at slot t on global layers and
    t % ring on sliding ones, as `KVCache` does for one row; `load` copies a prefilled KVCache in.
    A decode step writes each row's slot, then attends over the first `span` slots with a mask per row
    (no mask at all for a single row, so that step is the one `Engine` runs).
    """

    def __init__(self, config: GemmaTextConfig, rows: int, capacity: int, dtype: torch.dtype, device):
        self.window, self.capacity, self.rows = config.sliding_window, capacity, rows
        self.ring = min(self.window, capacity)
        self.layer_types = config.layer_types
        shape = (rows, config.num_key_value_heads, 0, config.head_dim)
        self.keys, self.values = [], []
        for kind in self.layer_types:
            slots = capacity if kind == FULL else self.ring
            self.keys.append(torch.zeros(shape[:2] + (slots,) + shape[3:], dtype=dtype, device=device))
            self.values.append(torch.zeros(shape[:2] + (slots,) + shape[3:], dtype=dtype, device=device))
        self._n = 0
        self._slots: dict[str, torch.Tensor] = {}
        self._span = {FULL: 0, SLIDING: 0}

    @staticmethod
    def nbytes_for(config: GemmaTextConfig, rows: int, capacity: int, dtype: torch.dtype) -> int:
        return KVCache.nbytes_for(config, rows, capacity, dtype)

    def load(self, row: int, cache: KVCache) -> None:
        """Copy a prefilled batch-1 KVCache (no padding) into `row`."""
        n = cache.length
        if n > self.capacity:
            raise ValueError(f"{n} steps do not fit the {self.capacity} slots of a row")
        filled = min(n, cache.ring)
        for idx, kind in enumerate(self.layer_types):
            m = n if kind == FULL else filled
            self.keys[idx][row, :, :m] = cache.keys[idx][0, :, :m]
            self.values[idx][row, :, :m] = cache.values[idx][0, :, :m]

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s contents into row `dst` (keeps the running rows packed after a retirement)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[dst] = t[src]

    def begin(self, positions: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """A decode step of rows [0, n), one token each at `positions` [n, 1] (= its time step)."""
        n = positions.shape[0]
        last = int(positions.max())
        if last >= self.capacity:
            raise ValueError(f"KV cache row full: position {last} >= capacity {self.capacity}")
        self._n = n
        self._slots = {FULL: positions[:, 0], SLIDING: positions[:, 0] % self.ring}
        self._span = {FULL: last + 1, SLIDING: min(last + 1, self.ring)}
        if n == 1:
            return {FULL: None, SLIDING: None}
        return {kind: (torch.arange(span, device=positions.device) <= positions)[:, None, None]
                for kind, span in self._span.items()}  # fmt: skip

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.layer_types[layer_idx]
        rows = torch.arange(self._n, device=k.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, self._slots[kind]] = k[:, :, 0]
        values[rows, :, self._slots[kind]] = v[:, :, 0]
        span = self._span[kind]
        return keys[: self._n, :, :span], values[: self._n, :, :span]
