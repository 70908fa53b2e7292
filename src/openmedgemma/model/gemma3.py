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
from openmedgemma.model.layers import GemmaRMSNorm, RotaryTable, apply_rotary, gelu_tanh


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

    def forward(self, x, cos, sin, mask, kv_cache=None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


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
        tables = {kind: rope(positions, x.dtype) for kind, rope in self.rope.items()}
        for layer in self.layers:
            kind = layer.self_attn.layer_type
            cos, sin = tables[kind]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks[kind], kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[kind], kv_cache)
        return self.norm(x)
