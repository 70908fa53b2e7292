"""Building blocks shared by the Gemma 3 decoder and the projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GemmaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 with a (1 + w) gain; weights start at 0 (identity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._gain: tuple | None = None  # (weight's identity and version, 1 + w): see `gain`
        self.fused = None  # optional one-op norm an engine installs: fused(x, gain, eps) -> y, or None to decline

    def gain(self) -> torch.Tensor:
        """(1 + w) in fp32. Without autograd it is kept until the weight changes (a decode step runs hundreds of
        norms, each op costing more than its arithmetic on small models); with autograd it is recomputed."""
        w = self._parameters["weight"]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return 1.0 + w.float()
        return self._held(w)[3]

    def _held(self, w: torch.Tensor) -> tuple:
        """(weight, its version, its data pointer, 1 + w, eps as a tensor), remade when the weight changed."""
        held = self._gain
        if held is None or held[0] is not w or held[1] != w._version or held[2] != w.data_ptr():
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable outside inference mode
                eps = torch.tensor(self.eps, dtype=torch.float32, device=w.device)
                held = self._gain = (w, w._version, w.data_ptr(), 1.0 + w.detach().float(), eps)
        return held

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """gain: another (1 + w) broadcast over x's last dims (q and k heads normed together take both gains)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training: the reference's exact ops
            gain = self.gain() if gain is None else gain
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * gain).to(x.dtype)
        # the same in fewer ops (sum * (1 / n) + eps in one, in place): a decode step runs hundreds of norms
        held = self._held(self._parameters["weight"])
        if self.fused is not None:  # one op instead of seven (engine.fast installs it in quantized CPU fp32 decoders)
            y = self.fused(x, held[3] if gain is None else gain, self.eps)
            if y is not None:
                return y
        h = x.float()
        r = torch.add(held[4], (h * h).sum(-1, keepdim=True), alpha=1.0 / h.shape[-1]).rsqrt_()
        out = (h * r).mul_(held[3] if gain is None else gain)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RotaryTable(nn.Module):
    """NeoX-style (half-rotation) RoPE for one layer type: theta and an optional linear scale."""

    def __init__(self, head_dim: int, theta: float, linear_factor: float = 1.0):
        super().__init__()
        # on the CPU even while a model is built on the meta device (not stored in checkpoints: computed here)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        self.register_buffer("inv_freq", inv_freq / linear_factor, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (computed in fp32)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with the half-rotation's sign folded in ([-sin, sin] halves), for `rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """NeoX-style RoPE in four ops: x * cos + roll(x, half) * signed sin (tables broadcast to x). The same roundings
    as the reference's x * cos + cat(-x2, x1) * sin (a sign flip is exact; no fused multiply-add)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed
