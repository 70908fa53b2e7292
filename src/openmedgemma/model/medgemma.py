"""MedGemma: the Gemma 3 decoder, plus the SigLIP vision tower and projector when multimodal."""

from __future__ import annotations

import torch
from torch import nn

from openmedgemma.checkpoint import rename_rules
from openmedgemma.config import MedGemmaConfig
from openmedgemma.model.gemma3 import GemmaDecoder
from openmedgemma.model.layers import GemmaRMSNorm
from openmedgemma.model.masks import decoder_masks, image_block_ids
from openmedgemma.model.pretrained import PretrainedMixin
from openmedgemma.model.siglip import SiglipVisionTransformer

FP16_REASON = (
    "Gemma 3 activations exceed the float16 range (65504) and overflow to inf/NaN, giving empty or "
    "garbage output; use bfloat16 (GPU) or float32 (CPU)"
)


class VisionTower(nn.Module):
    """Holds the SigLIP tower under `vision_model`, matching the checkpoint's `vision_tower.vision_model.*`."""

    def __init__(self, cfg):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)


class MultiModalProjector(nn.Module):
    """[N, 64*64, 1152] -> avg-pool 4x4 on the patch grid -> RMSNorm -> x @ W ([1152, hidden]) -> [N, 256, hidden]."""

    def __init__(self, config: MedGemmaConfig):
        super().__init__()
        v = config.vision
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(v.hidden_size, config.text.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.patches_per_side = v.image_size // v.patch_size
        self.pool = self.patches_per_side // round(config.mm_tokens_per_image**0.5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, _, h = patches.shape
        grid = patches.transpose(1, 2).reshape(n, h, self.patches_per_side, self.patches_per_side)
        pooled = nn.functional.avg_pool2d(grid, self.pool, self.pool).flatten(2).transpose(1, 2)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(patches)


class MedGemma(PretrainedMixin, nn.Module):
    """`MedGemma.from_pretrained(path)`, then `model(input_ids, pixel_values=None) -> logits [B, T, vocab]`.

    Positions holding the image soft-token id receive the projected features of `pixel_values`
    ([N_images, 3, H, W]) in order; the soft tokens of one image attend to each other both ways.
    """

    config_class = MedGemmaConfig
    refuse_fp16 = FP16_REASON

    def __init__(self, config: MedGemmaConfig):
        super().__init__()
        self.config = config
        self.language_model = GemmaDecoder(config.text)
        if config.is_multimodal:
            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = MultiModalProjector(config)

    # --- pieces the engine and trainers compose -------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected soft tokens [N, mm_tokens_per_image, hidden] for images [N, 3, H, W]."""
        if not self.config.is_multimodal:
            raise ValueError("this is a text-only MedGemma checkpoint; it cannot take images")
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        patches = self.vision_tower.vision_model(pixel_values.to(dtype))
        return self.multi_modal_projector(patches)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features scattered into the soft-token positions."""
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        n_tokens = int(is_image.sum())
        ids = input_ids
        if image_id >= self.config.text.vocab_size:  # no embedding row for the soft token
            ids = input_ids.masked_fill(is_image, 0)
        x = self.language_model.embed(ids)
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            per = self.config.mm_tokens_per_image
            raise ValueError(
                f"the prompt holds {n_tokens} image soft tokens ({n_tokens / per:g} images of {per}) but "
                f"{n_features // per} image(s) were given"
            )
        if n_tokens:
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head: hidden @ embed_tokens.T."""
        return nn.functional.linear(hidden, self.language_model.embed_tokens.weight)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] of a full sequence (no cache); `forward` minus the head.

        attention_mask [B, T] (1 = token, 0 = padding) is optional. Positions count real tokens only,
        so a left-padded row gets the same positions as unpadded.
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give pixel_values or image_features, not both")
            image_features = self.image_features(pixel_values)
        x = self.embed(input_ids, image_features)
        b, t = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
            valid = None
        else:
            valid = attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        blocks = image_block_ids(input_ids, self.config.image_token_index) if self.config.is_multimodal else None
        masks = decoder_masks(positions, positions, self.config.text.sliding_window, blocks, blocks, valid)
        if valid is not None:  # a padding query sees nothing; let it see itself so SDPA stays finite
            eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
            masks = {k: m | (eye & ~valid[:, None, :, None]) for k, m in masks.items()}
        return self.language_model(x, positions, masks)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or the last `logits_to_keep` positions); arguments as `hidden_states`."""
        hidden = self.hidden_states(input_ids, pixel_values, attention_mask, image_features)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)

    # --- checkpoint names -----------------------------------------------------------------------
    @staticmethod
    def _disk_to_internal(config: MedGemmaConfig):
        if not config.is_multimodal:
            return rename_rules([("model.", "language_model.")], skip=["lm_head.weight"])
        return rename_rules(
            [
                ("model.language_model.", "language_model."),
                ("language_model.model.", "language_model."),
                # Google's files and transformers 4.x nest the tower under `vision_model.`; 5.x does not.
                ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                ("vision_tower.vision_model.", "vision_tower.vision_model."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
            ],
            skip=["lm_head.weight", "language_model.lm_head.weight"],
        )

    @staticmethod
    def _internal_to_disk(config: MedGemmaConfig, layout: str):
        if not config.is_multimodal:
            return rename_rules([("language_model.", "model.")])
        if layout == "original":
            return rename_rules([("language_model.", "language_model.model.")])
        return rename_rules([("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector.")])  # fmt: skip

    # --- generation (delegates to openmedgemma.engine) ------------------------------------------
    def chat(self, messages, **gen_kwargs):
        """The answer to `messages` (chat messages, or one question as a string); keyword arguments are
        `GenerationConfig` fields, plus `return_result=True` for the full `GenerationResult`."""
        from openmedgemma.engine.engine import engine_for

        return engine_for(self).chat(messages, **gen_kwargs)

    def stream(self, messages, **gen_kwargs):
        """Text deltas of the answer to `messages` as they are generated (see `Engine.stream`)."""
        from openmedgemma.engine.engine import engine_for

        return engine_for(self).stream(messages, **gen_kwargs)
