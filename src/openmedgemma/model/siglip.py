"""SigLIP towers: the vision transformer (MedGemma's and MedSigLIP's image encoder) and the text
transformer (MedSigLIP). Non-causal pre-LayerNorm blocks; module names follow the checkpoint's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.config import SiglipTextConfig, VisionConfig
from openmedgemma.model.layers import gelu_tanh


class SiglipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x, mask=None):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h))


class SiglipMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SiglipAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SiglipMLP(hidden, intermediate)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, hidden, heads, intermediate, eps, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(SiglipBlock(hidden, heads, intermediate, eps) for _ in range(num_layers))
        self.gradient_checkpointing = False

    def forward(self, x, mask=None):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.position_embedding.num_embeddings:
            side = round(self.position_embedding.num_embeddings**0.5) * self.patch_embedding.stride[0]
            raise ValueError(
                f"pixel_values of {tuple(pixel_values.shape[-2:])} give {patches.shape[1]} patches; "
                f"this vision tower takes {side}x{side} images"
            )
        return patches + self.position_embedding.weight


class AttentionPoolingHead(nn.Module):
    """SigLIP's MAP head: a learned probe attends over the patch tokens, then LayerNorm + MLP residual."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        probe = self.probe.expand(x.shape[0], -1, -1)
        h = self.attention(probe, x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps, cfg.num_hidden_layers
        )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = AttentionPoolingHead(cfg) if cfg.use_head else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features [N, patches, hidden] after post_layernorm."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipTextTransformer(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = SiglipEncoder(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps, cfg.num_hidden_layers
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled text embedding [B, projection]: the last position's state (inputs are padded to max length)."""
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"text of {t} tokens is longer than the {self.config.max_position_embeddings} this tower takes")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:t]
        x = self.final_layer_norm(self.encoder(x))
        return self.head(x[:, -1])
