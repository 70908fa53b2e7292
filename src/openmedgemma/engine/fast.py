"""The Gemma 3 decoder's forward for generation, with about half the tensor ops of the modules' forward.

At a few million parameters a decode step costs what its small ops cost to dispatch (~2 us each on
CPU), not the arithmetic. This computes the same function as `GemmaDecoder.forward` with fewer ops:
  - RMSNorm in 4 ops (sum of squares, eps + ss / n, rsqrt, two products), computed in fp32;
  - RoPE tables computed once per generation for every position it will use, the half-rotation's
    sign folded into `sin`: a rotation is x * cos + roll(x, half) * sin_signed;
  - a decode step (one token per row) keeps activations 2-D, and normalizes and rotates q and k
    together (one tensor of n_heads + n_kv heads, the two gains stacked).
It calls the model's own linear modules (so int8 layers or adapters are used as they are), reads the
norm weights and packed buffers at each prefill (so training between generations is seen), and returns what the
modules would: normed hidden states. The engine's parity tests prove it against transformers.

On CPU, `pack_weights` also re-lays out the decoder's plain linear weights in place (same values, same
shapes; see there), so a decode step runs one matmul for q, k, v and one for gate and up, each over
the layout MKL's 1-row matmul streams fastest. `compile=True` runs the decode step through
`torch.compile` (inductor's C++ on CPU): the step is traced once over the whole preallocated cache
(masks from the step index, a tensor), so its shapes stay static while the cache fills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.config import FULL, SLIDING


def pack_weights(language_model) -> None:
    """Re-lay out the decoder's CPU float weights in place for 1-row matmuls: same values and shapes.

    MKL's 1-row fp32 matmul (this engine's decode) streams a weight [N, K] with N >= K about 1.3-1.8x
    faster from a [K, N] row-major buffer than from [N, K] (measured on AVX2 EPYC: 15-17 vs 7-11 GB/s),
    and it is memory bound. So q, k, v (and gate, up) become column blocks of one [K, sum N] buffer
    (each `weight` a transposed view into it, which F.linear and the fused decode matmul read in
    place), as do o_proj and the tied embedding / head when they are wide; narrow weights (down_proj)
    are already in their fast layout. No copy is kept, so memory does not grow; savers call
    `.contiguous()`. Plain `nn.Linear`s without bias only (int8 layers and adapters are left alone);
    idempotent.
    """
    emb = language_model.embed_tokens
    if emb.weight.device.type != "cpu" or emb.weight.dtype != torch.float32:
        return  # measured for fp32 MKL only
    for layer in language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj)):
            if all(type(m) is nn.Linear and m.bias is None for m in group) and _fused(group) is None:
                _pack(group)
    if emb.weight.shape[0] >= emb.weight.shape[1] and emb.weight.stride(1) == 1:
        _pack((emb,))


def onednn_prepack_available(language_model) -> bool:
    """oneDNN's prepacked linear (the ops inductor's CPU freezing uses) for fp32 weights on the CPU."""
    weight = language_model.embed_tokens.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # fmt: skip


def _pack(modules) -> None:
    weights = [m.weight for m in modules]
    if sum(w.shape[0] for w in weights) < weights[0].shape[1]:
        return  # narrow: [N, K] row-major is already the fast layout
    with torch.no_grad():
        buffer = torch.cat([w.detach().t() for w in weights], 1)  # [K, sum N], row-major
    start = 0
    for m, w in zip(modules, weights):
        m.weight.data = buffer[:, start : start + w.shape[0]].t()
        start += w.shape[0]


def _fused(modules) -> torch.Tensor | None:
    """The [K, sum N] buffer `pack_weights` put these linears' weights in (a view), or None."""
    weights = [getattr(m, "weight", None) for m in modules]
    if any(type(m) is not nn.Linear or m.bias is not None for m in modules):
        return None
    first = weights[0]
    total = sum(w.shape[0] for w in weights)
    if first.stride() != (1, total):
        return None
    start = first.data_ptr()
    for w in weights:  # consecutive column blocks of one buffer, in order
        if w.stride() != (1, total) or w.data_ptr() != start:
            return None
        start += w.shape[0] * w.element_size()
    return first.detach().as_strided((first.shape[1], total), (total, 1))


class FastDecoder:
    def __init__(self, language_model, *, compile: bool = False, prepack: bool = False):
        self.lm = language_model
        pack_weights(language_model)
        # prepack: decode matmuls through oneDNN over a copy of the linear weights reordered once into its
        # blocked layout. MKL's sgemm re-packs a whole weight on every call with 2+ rows (a 768 x 6144 matrix:
        # 2.1 ms at 4 rows against 0.46 ms at 1); oneDNN's prepacked linear takes 0.26 ms. So a continuous-
        # batching step of 16 rows costs ~1.6x one row instead of ~2.7x, for a second copy of those weights.
        self.prepack = prepack and onednn_prepack_available(language_model)
        self._onednn: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}  # id(first linear) -> (versions, w)
        # compile: decode steps run `_static_step` through torch.compile (built on the first step; dynamic
        # shapes, so other batch sizes / cache capacities reuse it). While tracing, the helpers below
        # skip their host-side caches (read in `refresh`, outside the graph); the compiled graph
        # recomputes the gains (fused into the norms) instead.
        self.compile = compile
        self._compiled = None
        self._tracing = False
        self.compile_seconds = 0.0
        cfg = language_model.config
        self.kinds = cfg.layer_types
        self.eps = cfg.rms_norm_eps
        self._gains: dict[int, torch.Tensor] = {}  # id(norm) -> 1 + w; id(attn) -> stacked q / k gains
        self._consts: dict[tuple, torch.Tensor] = {}
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._table_len = 0
        self._packed: dict[int, torch.Tensor | None] = {}  # id(first linear of a group) -> its packed buffer
        if self.prepack:
            self.refresh()  # the copy is made now, at load time, where its memory is expected

    # ------------------------------------------------------------------ pieces

    def _const(self, value: float, dtype: torch.dtype, device) -> torch.Tensor:
        key = (value, dtype, device)
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.tensor(value, dtype=dtype, device=device)
        return t

    def refresh(self) -> None:
        """Read the norm gains and the packed linear buffers from the weights as they are now.

        Run by each prefill (`__call__`): weights cannot change within a generation (inference mode), and
        training between generations (RL rollouts) is seen by the next one. Decode steps then only look
        the results up, instead of checking every weight's version on every token.
        """
        gains, packed = {}, {}
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                         layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm):  # fmt: skip
                gains[id(norm)] = 1.0 + norm.weight.detach().float()
            q, k = gains[id(attn.q_norm)], gains[id(attn.k_norm)]
            gains[id(attn)] = torch.cat([q.expand(attn.n_heads, -1), k.expand(attn.n_kv, -1)])[:, None]
            for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj)):
                packed[id(group[0])] = _fused(group)
        gains[id(self.lm.norm)] = 1.0 + self.lm.norm.weight.detach().float()
        self._gains, self._packed = gains, packed
        if self.prepack:
            for layer in self.lm.layers:
                attn, mlp = layer.self_attn, layer.mlp
                for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                              (mlp.down_proj,)):  # fmt: skip
                    self._reorder(group)

    def _reorder(self, group) -> None:
        """(Re)make the oneDNN copy of a group's weights when they changed (training between generations)."""
        if not all(type(m) is nn.Linear and m.bias is None for m in group):
            return
        versions = tuple(m.weight._version for m in group)
        held = self._onednn.get(id(group[0]))
        if held is None or held[0] != versions:
            weight = torch.cat([m.weight.detach() for m in group])
            self._onednn[id(group[0])] = (versions, torch.ops.mkldnn._reorder_linear_weight(weight, None))

    @property
    def prepacked_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for _, w in self._onednn.values())

    def _gain(self, norm) -> torch.Tensor:
        """(1 + w) in fp32."""
        if self._tracing:
            return 1.0 + norm.weight.float()
        return self._gains[id(norm)]

    def _qk_gain(self, attn) -> torch.Tensor:
        """The q_norm and k_norm gains stacked per head: [n_heads + n_kv, 1, head_dim]."""
        if self._tracing:
            q, k = self._gain(attn.q_norm), self._gain(attn.k_norm)
            return torch.cat([q.expand(attn.n_heads, -1), k.expand(attn.n_kv, -1)])[:, None]
        return self._gains[id(attn)]

    def _norm(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * gain, in fp32, cast back to x's dtype."""
        h = x.float()
        ss = (h * h).sum(-1, keepdim=True)
        if self._tracing:
            return (h * torch.rsqrt(ss * (1.0 / x.shape[-1]) + self.eps) * gain).to(x.dtype)
        r = torch.add(self._const(self.eps, torch.float32, x.device), ss, alpha=1.0 / x.shape[-1]).rsqrt_()
        return (h * r).mul_(gain).to(x.dtype)

    def _matmul(self, h: torch.Tensor, modules) -> torch.Tensor:
        """h through several linears, outputs concatenated: one matmul over their packed buffer if packed."""
        # compiled: separate matmuls cost no dispatch there (and data_ptr cannot be traced)
        if self.prepack and not self._tracing:
            held = self._onednn.get(id(modules[0]))
            if held is not None:
                return torch.ops.mkldnn._linear_pointwise(h, held[1], None, "none", [], "")
        packed = None if self._tracing else self._packed.get(id(modules[0]))
        if packed is not None:
            return torch.mm(h, packed)
        return torch.cat([m(h) for m in modules], 1) if len(modules) > 1 else modules[0](h)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (no image features) times sqrt(hidden) rounded to the weight dtype."""
        if self._tracing:
            return self.lm.embed(input_ids)
        table = self.lm.embed_tokens.weight
        return F.embedding(input_ids, table) * self._const(self.lm.config.hidden_size**0.5, table.dtype, table.device)

    def prepare(self, max_position: int, dtype: torch.dtype, device) -> None:
        """Precompute cos / sign-folded sin for positions [0, max_position] (grown on demand)."""
        if max_position < self._table_len:
            cos = self._tables[SLIDING][0]
            if cos.dtype == dtype and cos.device == torch.device(device):
                return
        n = max(max_position + 1, 2 * self._table_len)
        positions = torch.arange(n, device=device)[None]
        for kind in (SLIDING, FULL):
            cos, sin = self.lm.rope[kind](positions, dtype)
            half = sin.shape[-1] // 2
            self._tables[kind] = (cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1))
        self._table_len = n

    def _rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type: cos and signed sin at `positions` [B, T], shaped [B, 1, T, head_dim]."""
        return {kind: (cos[positions][:, None], sin[positions][:, None]) for kind, (cos, sin) in self._tables.items()}

    # ------------------------------------------------------------------ forward

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, kv_cache) -> torch.Tensor:
        """Any number of tokens: x [B, T, H] embeddings, positions [B, T]."""
        self.refresh()
        self.prepare(int(positions.max()), x.dtype, x.device)
        tables = self._rope(positions)
        b, t, _ = x.shape
        norm, gain = self._norm, self._gain
        for idx, layer in enumerate(self.lm.layers):
            cos, sin = tables[self.kinds[idx]]
            attn = layer.self_attn
            h = norm(x, gain(layer.input_layernorm))
            q = attn.q_proj(h).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
            q = self._rotate(norm(q, gain(attn.q_norm)), cos, sin)
            k = self._rotate(norm(k, gain(attn.k_norm)), cos, sin)
            k, v = kv_cache.update(idx, k, v)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=masks[self.kinds[idx]], scale=attn.scale, enable_gqa=attn.n_kv != attn.n_heads
            )
            o = attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
            x = x + norm(o, gain(layer.post_attention_layernorm))
            x = x + norm(self._mlp(layer.mlp, norm(x, gain(layer.pre_feedforward_layernorm))),
                         gain(layer.post_feedforward_layernorm))  # fmt: skip
        return norm(x, gain(self.lm.norm))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, masks: dict, kv_cache) -> torch.Tensor:
        """One token per row: tokens [B], positions [B, 1] -> normed hidden states [B, H]."""
        if self.compile and not self._tracing:
            return self._compiled_decode(tokens, positions, kv_cache)
        x = self.embed(tokens)
        tables = self._rope(positions)
        b = x.shape[0]
        norm, gain = self._norm, self._gain
        for idx, layer in enumerate(self.lm.layers):
            kind = self.kinds[idx]
            cos, sin = tables[kind]
            attn = layer.self_attn
            heads, kv, dim = attn.n_heads, attn.n_kv, attn.head_dim
            h = norm(x, gain(layer.input_layernorm))
            qkv = self._matmul(h, (attn.q_proj, attn.k_proj, attn.v_proj))
            qk = self._rotate(norm(qkv[:, : (heads + kv) * dim].view(b, heads + kv, 1, dim), self._qk_gain(attn)),
                              cos, sin)  # fmt: skip
            k, v = kv_cache.update(idx, qk[:, heads:], qkv[:, (heads + kv) * dim :].view(b, kv, 1, dim))
            o = F.scaled_dot_product_attention(qk[:, :heads], k, v, attn_mask=masks[kind], scale=attn.scale,
                                               enable_gqa=kv != heads)  # fmt: skip
            x = x + norm(self._matmul(o.view(b, heads * dim), (attn.o_proj,)), gain(layer.post_attention_layernorm))
            mlp = layer.mlp
            gate, up = self._matmul(norm(x, gain(layer.pre_feedforward_layernorm)), (mlp.gate_proj, mlp.up_proj)
                                    ).chunk(2, 1)  # fmt: skip
            x = x + norm(self._matmul(F.gelu(gate, approximate="tanh") * up, (mlp.down_proj,)),
                         gain(layer.post_feedforward_layernorm))  # fmt: skip
        return norm(x, gain(self.lm.norm))

    @staticmethod
    def _mlp(mlp, h: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(F.gelu(mlp.gate_proj(h), approximate="tanh") * mlp.up_proj(h))

    # ------------------------------------------------------------------ compiled decode

    def _compiled_decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache) -> torch.Tensor:
        """`decode` through torch.compile; `kv_cache.begin` has run (it keeps the slot bookkeeping)."""
        if self._compiled is None:
            import time

            self._compiled = torch.compile(self._static_step, dynamic=True)
            t = time.perf_counter()
            out = self._run_compiled(tokens, positions, kv_cache)  # the first call builds it
            self.compile_seconds = time.perf_counter() - t
            return out
        return self._run_compiled(tokens, positions, kv_cache)

    def _run_compiled(self, tokens, positions, kv_cache) -> torch.Tensor:
        step = torch.tensor([kv_cache.length - 1], device=tokens.device)  # time step of this token (a tensor:
        # a Python int would be baked into the graph and recompile every step)
        valid = (kv_cache.valid, kv_cache.ring_valid) if kv_cache.padded else None
        self._tracing = True
        try:
            return self._compiled(tokens, positions, step, kv_cache.keys, kv_cache.values, valid)
        finally:
            self._tracing = False

    def _static_step(self, tokens, positions, step, keys, values, valid) -> torch.Tensor:
        """A decode step over the whole preallocated cache: slot `step` (global layers) or `step % ring`
        (sliding) is written, and a mask hides slots not yet written (and padding: `valid`, kept by
        `KVCache.begin`). Same keys and values as the eager step, so the same function."""
        capacity = next(k.shape[2] for k, kind in zip(keys, self.kinds) if kind == FULL) if FULL in self.kinds else 0
        ring = next(k.shape[2] for k, kind in zip(keys, self.kinds) if kind == SLIDING) if SLIDING in self.kinds else 0
        if valid is None:
            masks = {FULL: (torch.arange(capacity, device=step.device) <= step)[None, None, None],
                     SLIDING: (torch.arange(ring, device=step.device) <= step)[None, None, None]}  # fmt: skip
        else:
            masks = {FULL: valid[0][:, None, None], SLIDING: valid[1][:, None, None]}
        return self.decode(tokens, positions, masks, _StaticSlots(keys, values, self.kinds, step, ring))


class _StaticSlots:
    """`KVCache.update` for `_static_step`: write this step's slot, attend over the whole layer buffer."""

    def __init__(self, keys, values, kinds, step, ring):
        self.keys, self.values, self.kinds = keys, values, kinds
        self.slots = {FULL: step, SLIDING: step % max(ring, 1)}

    def update(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slots[self.kinds[idx]]
        self.keys[idx].index_copy_(2, slot, k)
        self.values[idx].index_copy_(2, slot, v)
        return self.keys[idx], self.values[idx]
