"""Building the model to train, and the modules a trainer wraps (DDP / FSDP call their `forward`).

The losses start from `MedGemma.hidden_states` (the forward without the vocabulary projection), so that they
project only the positions they need onto the vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from openmedgemma.errors import ConfigError
from openmedgemma.train.losses import (
    IGNORE,
    causal_lm_loss,
    grpo_loss,
    shift_labels,
    sigmoid_loss,
    sparse_distill_loss,
    token_logprobs,
    upcast,
)

# ----------------------------------------------------------------------------- building


def build_model(section, kind: str):
    """MedGemma (kind="medgemma") or MedSigLIP (kind="medsiglip") from a [model] section."""
    from openmedgemma.config import from_hf_config, get_config, read_hf_config
    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.model.medsiglip import MedSigLIP
    from openmedgemma.model.pretrained import resolve_dtype

    cls = MedSigLIP if kind == "medsiglip" else MedGemma
    dtype = resolve_dtype(section.dtype)
    if section.path:
        model = cls.from_pretrained(Path(section.path).expanduser(), dtype=dtype)
    else:
        ref = section.config
        path = Path(ref).expanduser()
        cfg = from_hf_config(read_hf_config(path)) if path.exists() else get_config(ref)
        if not isinstance(cfg, cls.config_class):
            raise ConfigError(f"model.config = {ref!r} is a {type(cfg).__name__}; this stage trains a {cls.__name__}")
        model = cls(cfg)
        init_weights(model, section.init_std)
        model = model.to(dtype)
    return model.train()


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """A fresh model's init: normal(0, std) for linear / embedding / conv weights (embeddings scaled by
    1/sqrt(hidden), as they are multiplied by sqrt(hidden)), zero biases, norms at identity, SigLIP's
    logit_scale = log 10 and logit_bias = -10. Uses the global torch RNG (seed it first)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0, std if "position" in name else 1 / math.sqrt(module.embedding_dim))
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") and p.ndim == 1 and not isinstance(_owner(model, name), nn.LayerNorm):
            p.zero_()  # Gemma RMSNorm: (1 + w)
        elif name.endswith("mm_input_projection_weight"):
            p.normal_(0, std)
        elif name.endswith("probe"):
            p.normal_(0, std)
    if hasattr(model, "logit_scale"):
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


def freeze_parts(model: nn.Module, parts: list[str]) -> None:
    """requires_grad = False for every parameter under the named top-level parts."""
    for name, p in model.named_parameters():
        clean = name.removeprefix("base_model.model.")
        if any(clean == part or clean.startswith(part + ".") for part in parts):
            p.requires_grad_(False)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enabled


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (names and state dict unchanged)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile()


# ----------------------------------------------------------------------------- MedGemma pieces


class LMModule(nn.Module):
    """Wraps a MedGemma for training. forward(mode="loss") -> (CE sum, targets, stats); mode="logits" returns
    the last position's logits (rollouts); mode="logp" returns [B, T] with logp[:, t] = log p(token t + 1) at
    the positions predicting a completion token (`completion_mask`), 0 elsewhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_features=None,
                completion_mask=None, mode: str = "loss", **_):
        hidden = self.model.hidden_states(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                          image_features=image_features)
        if mode == "logits":
            return self.model.logits(hidden[:, -1]).float()
        if mode == "logp":
            # GRPO reads only completion tokens: project just those positions onto the vocabulary
            keep = shift_labels(completion_mask.long()) > 0
            picked = token_logprobs(self.model.logits(hidden[keep]), shift_labels(input_ids)[keep])
            logp = picked.new_zeros(input_ids.shape)
            logp[keep] = picked
            return logp
        loss, count = causal_lm_loss(hidden, self.model.language_model.embed_tokens.weight, labels)
        return loss, count, {}


class DistillModule(nn.Module):
    """Cross-entropy on the stored teacher subset (+ hard_label_weight x next-token CE on the same targets)."""

    def __init__(self, model: nn.Module, hard_label_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.hard_label_weight = hard_label_weight

    def forward(self, input_ids, attention_mask, labels, teacher_indices, teacher_probs, **_):
        hidden = self.model.hidden_states(input_ids, attention_mask=attention_mask)
        keep = shift_labels(labels) != IGNORE
        logits = self.model.logits(hidden[keep])
        loss = sparse_distill_loss(logits, teacher_indices[keep], teacher_probs[keep])
        stats = {}
        if self.hard_label_weight:
            hard = nn.functional.cross_entropy(upcast(logits), shift_labels(labels)[keep], reduction="sum")
            loss = loss + self.hard_label_weight * hard
            stats["hard_ce_sum"] = float(hard)
        return loss, int(keep.sum()), stats


class GRPOModule(LMModule):
    """GRPO on completion tokens. The batch carries sequences (prompt + completion), completion_mask,
    advantages and, when needed, old_logp / ref_logp; see `losses.grpo_loss`. Other modes as LMModule."""

    def __init__(self, model: nn.Module, clip_eps: float, kl_coef: float, agg: str):
        super().__init__(model)
        self.clip_eps, self.kl_coef, self.agg = clip_eps, kl_coef, agg

    def forward(self, input_ids, attention_mask=None, completion_mask=None, advantages=None, old_logp=None,
                ref_logp=None, pixel_values=None, mode: str = "loss", **kwargs):
        if mode != "loss" or completion_mask is None:
            return super().forward(input_ids, attention_mask, pixel_values=pixel_values,
                                   completion_mask=completion_mask, mode=mode, **kwargs)  # fmt: skip
        logp = super().forward(input_ids, attention_mask, pixel_values=pixel_values, completion_mask=completion_mask,
                               mode="logp")  # fmt: skip
        # logp[:, t] is log p(token t+1): align the completion mask with the predicting positions
        mask = shift_labels(completion_mask.long()) > 0
        old = logp.detach() if old_logp is None else old_logp
        return grpo_loss(logp, old, advantages, mask, self.clip_eps, ref_logp, self.kl_coef, self.agg)


class SiglipModule(nn.Module):
    """The sigmoid loss of a MedSigLIP on a batch of pairs. Distributed with `gather`: each rank scores its
    images against every rank's texts (as SigLIP's chunked implementation), so the loss is the global batch's."""

    def __init__(self, model: nn.Module, chunk_size: int = 0, gather: bool = True, duplicate_positives: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.gather = gather
        self.duplicate_positives = duplicate_positives

    def forward(self, input_ids, pixel_values, groups=None, **_):
        img = nn.functional.normalize(self.model.get_image_features(pixel_values), dim=-1)
        txt = nn.functional.normalize(self.model.get_text_features(input_ids), dim=-1)
        # pairs of one group (the same caption, or one class's captions) are not negatives of each other
        keys = groups.unsqueeze(-1) if groups is not None else input_ids
        offset, norm, all_keys = 0, img.shape[0], keys
        if self.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                from openmedgemma.train.distributed import gather_rows

                txt = gather_rows(txt)
                all_keys = gather_rows(keys)
                offset, norm = torch.distributed.get_rank() * img.shape[0], img.shape[0] * world
        positives = (keys[:, None, :] == all_keys[None, :, :]).all(-1) if self.duplicate_positives else None
        loss = sigmoid_loss(upcast(img), upcast(txt), self.model.logit_scale, self.model.logit_bias,
                            positive_offset=offset, normalizer=norm, chunk_size=self.chunk_size,
                            positives=positives)  # fmt: skip
        # the step divides by the number of micro-batches; `norm` already made this a per-image mean
        return loss * (norm // img.shape[0]), 1, {}
