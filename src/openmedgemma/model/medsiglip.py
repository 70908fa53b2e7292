"""MedSigLIP: SigLIP dual encoder (vision tower with MAP head + text tower), sigmoid-scored."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.checkpoint import rename_rules
from openmedgemma.config import MedSigLIPConfig
from openmedgemma.model.pretrained import PretrainedMixin
from openmedgemma.model.siglip import SiglipTextTransformer, SiglipVisionTransformer


@dataclass
class SiglipOutput:
    logits_per_image: torch.Tensor  # [N_images, N_texts]
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor  # L2-normalized
    text_embeds: torch.Tensor


class MedSigLIP(PretrainedMixin, nn.Module):
    """`logits = normalize(img) @ normalize(txt).T * exp(logit_scale) + logit_bias`; probabilities are sigmoids."""

    config_class = MedSigLIPConfig

    def __init__(self, config: MedSigLIPConfig):
        super().__init__()
        if not config.vision.use_head:
            raise ValueError("MedSigLIP needs the vision tower's attention-pooling head (vision_use_head=True)")
        self.config = config
        self.text_model = SiglipTextTransformer(config.text)
        self.vision_model = SiglipVisionTransformer(config.vision)
        self.logit_scale = nn.Parameter(torch.tensor([10.0]).log())  # SigLIP init: log 10, bias -10
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image embeddings [N, D] (not normalized), as transformers' SiglipModel."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model.head(self.vision_model(pixel_values.to(dtype)))

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled text embeddings [M, D] (not normalized); pad input_ids to 64 tokens as MedSigLIP was trained."""
        return self.text_model(input_ids)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> SiglipOutput:
        img = F.normalize(self.get_image_features(pixel_values), dim=-1)
        txt = F.normalize(self.get_text_features(input_ids), dim=-1)
        logits_per_text = txt @ img.t() * self.logit_scale.exp() + self.logit_bias
        return SiglipOutput(logits_per_text.t(), logits_per_text, img, txt)

    @staticmethod
    def _disk_to_internal(config):
        return rename_rules([])

    @staticmethod
    def _internal_to_disk(config, layout):
        return rename_rules([])
