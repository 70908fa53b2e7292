"""The Gemma 3 decoder (MedGemma's language model).

Per block: x += post_attn_norm(attn(input_norm(x))); x += post_ff_norm(mlp(pre_ff_norm(x))).
Attention: GQA, QK-norm before RoPE, scale query_pre_attn_scalar**-0.5, sliding or global by layer.
The caller supplies boolean masks per layer type (see masks.py) and, when generating, a KV cache
object with `update(layer_idx, k, v) -> (keys, values)` whose key layout those masks describe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.config import FULL, SLIDING, GemmaTextConfig
from openmedgemma.model.layers import GemmaRMSNorm, RotaryTable, gelu_tanh, rotate, signed_sin


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = cfg.layer_types[layer_idx]
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qkv_kernel = self.o_kernel = None  # optional fused matmuls an engine installs (see `project`)
        self.attend = None  # optional decode attention an engine installs: attend(q, k, v, mask, scale) -> out or None
        self._qk_gain: tuple | None = None

    def qk_gain(self) -> torch.Tensor:
        """The q_norm and k_norm gains stacked per head, [n_heads + n_kv, head_dim]: q and k are normed together."""
        q, k = self.q_norm.gain(), self.k_norm.gain()
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.cat([q.expand(self.n_heads, -1), k.expand(self.n_kv, -1)])
        if self._qk_gain is None or self._qk_gain[0] is not q or self._qk_gain[1] is not k:
            self._qk_gain = (q, k, torch.cat([q.expand(self.n_heads, -1), k.expand(self.n_kv, -1)]))
        return self._qk_gain[2]

    def forward(self, x, cos, sin, mask, kv_cache=None):
        """x [B, T, H]; cos / sin [B, T, 1, head_dim], sin with its sign folded in (`layers.signed_sin`)."""
        b, t, _ = x.shape
        heads, kv, dim = self.n_heads, self.n_kv, self.head_dim
        qkv = project(x, (self.q_proj, self.k_proj, self.v_proj), self.qkv_kernel)
        qk = qkv[..., : (heads + kv) * dim].view(b, t, heads + kv, dim)
        qk = rotate(self.q_norm(qk, self.qk_gain()), cos, sin).transpose(1, 2)  # [B, heads + kv, T, D]
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[..., (heads + kv) * dim :].view(b, t, kv, dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = None
        if self.attend is not None and t == 1 and not torch.is_grad_enabled():  # one query per row: decode
            out = self.attend(q, k, v, mask, self.scale)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=kv != heads)
        return project(out.transpose(1, 2).reshape(b, t, heads * dim), (self.o_proj,), self.o_kernel)


def project(x: torch.Tensor, linears: tuple, kernel=None) -> torch.Tensor:
    """x through bias-free linear layers that read the same input, their outputs side by side.

    kernel: a fused matmul for the group that an engine installed (`engine.fast`: one matmul over the weights
    re-laid out as one buffer, a prepacked copy, or one call of a quantized kernel); it returns None when it
    does not apply (the weights were replaced, a shape it does not take), and is never used with autograd
    (nor, unless `traceable`, under torch.compile): then the layers run as they are (adapters, quantized layers
    included).
    """
    if kernel is not None and not torch.is_grad_enabled() and (
        not torch.compiler.is_compiling() or getattr(kernel, "traceable", False)
    ):
        y = kernel(x)
        if y is not None:
            return y
    if len(linears) == 1:
        return linears[0](x)
    return torch.cat([m(x) for m in linears], -1)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_kernel = self.down_kernel = None  # see `project`
        self.act = None  # optional one-op gelu_tanh(gate) * up an engine installs: act(gate|up) -> h, or None

    def forward(self, x):
        gate_up = project(x, (self.gate_proj, self.up_proj), self.gate_up_kernel)
        h = None
        if self.act is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            h = self.act(gate_up)
        if h is None:
            gate, up = gate_up.chunk(2, -1)
            h = gelu_tanh(gate) * up
        return project(h, (self.down_proj,), self.down_kernel)


class GemmaBlock(nn.Module):
    def __init__(self, cfg: GemmaTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.mlp = GemmaMLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaDecoder(nn.Module):
    """Embedding, blocks and final norm. Module names follow the checkpoint's (`embed_tokens`, `layers.N`, `norm`)."""

    def __init__(self, cfg: GemmaTextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(GemmaBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = nn.ModuleDict(
            {
                SLIDING: RotaryTable(cfg.head_dim, cfg.rope_local_theta),
                FULL: RotaryTable(cfg.head_dim, cfg.rope_global_theta, cfg.rope_global_linear_factor),
            }
        )
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # sqrt(hidden) is rounded to the weight dtype first, as the reference does (50.5 in bf16 for 4B).
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(input_ids) * scale

    def forward(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, kv_cache=None) -> torch.Tensor:
        """x: input embeddings [B, T, H]; positions [B, T]; masks per layer type. Returns normed hidden states."""
        tables = {}
        for kind, rope in self.rope.items():  # [B, T, 1, D]: broadcast over heads in [B, T, heads, D]
            cos, sin = rope(positions, x.dtype)
            tables[kind] = (cos[:, :, None], signed_sin(sin)[:, :, None])
        for layer in self.layers:
            kind = layer.self_attn.layer_type
            cos, sin = tables[kind]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks[kind], kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[kind], kv_cache)
        return self.norm(x)
