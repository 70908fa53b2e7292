"""MedSigLIP as the evaluation harness's `Embedder` (see `protocols.Embedder`).

    embedder = MedSigLIPEmbedder.from_pretrained("path/to/medsiglip-448")
    image_embeddings = embedder.embed_images(["cxr.png", rgb_array, pil_image])   # [N, D], unit rows
    text_embeddings = embedder.embed_texts(["a chest x-ray showing pneumonia"])   # [M, D], unit rows

Images: zero-padded to a square and resized to the model's image size by
`openmedgemma.imaging.to_pixel_values`; paths are read with `openmedgemma.imaging.load_image`
(DICOM, PNG, NIfTI... with their default windowing). Texts: `SiglipTextTokenizer`, padded to the
model's 64 positions. Inputs run through the model in chunks of `batch_size` under torch.no_grad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.tokenizer.siglip import SiglipTextTokenizer


class MedSigLIPEmbedder:
    """L2-normalised image and text embeddings (float32 numpy) from a MedSigLIP model."""

    def __init__(self, model, tokenizer: SiglipTextTokenizer, *, name: str = "medsiglip", batch_size: int = 16):
        if batch_size < 1:
            raise OpenMedGemmaError(f"batch_size must be positive, got {batch_size}")
        if tokenizer.max_length != model.config.text.max_position_embeddings:
            raise OpenMedGemmaError(
                f"{tokenizer.source}: the tokenizer pads to {tokenizer.max_length} tokens but the text tower has "
                f"{model.config.text.max_position_embeddings} positions and pools the last one"
            )
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, batch_size: int = 16) -> "MedSigLIPEmbedder":
        from openmedgemma.model.medsiglip import MedSigLIP

        folder = Path(path).expanduser()
        model = MedSigLIP.from_pretrained(folder, dtype=dtype, device=device)
        tokenizer = SiglipTextTokenizer.from_pretrained(folder, max_length=model.config.text.max_position_embeddings)
        return cls(model, tokenizer, name=folder.resolve().name or "medsiglip", batch_size=batch_size)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the model's temperature, used by zero-shot classification."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """[N, D] unit rows for uint8 arrays, PIL images, MedicalImages or file paths."""
        return self._embed(list(images), self._image_features)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[M, D] unit rows."""
        return self._embed(list(texts), self._text_features)

    def _image_features(self, images: list) -> torch.Tensor:
        from openmedgemma.imaging import load_image, to_pixel_values

        images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]  # paths: one chunk at a time
        pixels = to_pixel_values(images, size=self.model.config.vision.image_size)
        return self.model.get_image_features(pixels.to(self.device))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.get_text_features(self.tokenizer(texts).to(self.device))

    def _embed(self, items: list, features) -> np.ndarray:
        if not items:
            return np.zeros((0, self.model.config.text.projection_size), dtype=np.float32)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                out = features(items[start : start + self.batch_size])
                chunks.append(F.normalize(out.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks)
