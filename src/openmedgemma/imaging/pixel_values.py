"""RGB images -> the float tensor MedGemma's vision tower takes ("image to tensor").

MedGemma's training recipe pads to a square with zeros first (centred, as the official notebooks'
`pad_image_to_square`), then applies exactly what transformers' `Gemma3ImageProcessor` does with
the Hub `preprocessor_config.json`: PIL bilinear resize (`resample=2`) to size x size on the
uint8 image, x / 255 (in float64, stored as float32), then (x - 0.5) / 0.5 in float32; no
pan-and-scan; `do_convert_rgb` (gray -> RGB, transparency composited onto white).
Size 896 is MedGemma; 448 is MedSigLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.image import MedicalImage

MEDGEMMA_SIZE = 896
MEDSIGLIP_SIZE = 448
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
RESCALE_FACTOR = 1 / 255


def _normalisation_table() -> np.ndarray:
    """uint8 value -> model input, computed with the processor's own dtypes and order."""
    rescaled = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    return (rescaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


_TABLE = _normalisation_table()


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Zero-pad an [H, W] or [H, W, C] array to a square, centred (extra pixel after)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    size = max(height, width)
    top, left = (size - height) // 2, (size - width) // 2
    pad = [(top, size - height - top), (left, size - width - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="constant", constant_values=0)


def as_rgb_uint8(image) -> np.ndarray:
    """An [H, W, 3] uint8 array from a MedicalImage (via to_rgb), a PIL image or an array."""
    if isinstance(image, MedicalImage):
        from openmedgemma.imaging.windowing import to_rgb

        rgb = to_rgb(image)
        if rgb.ndim != 3:
            raise ImageError(f"{image.source}: a volume of {image.frames} slices is not one image; pass its slices")
        return rgb
    if hasattr(image, "mode") and hasattr(image, "getbands"):  # PIL.Image.Image
        from openmedgemma.imaging.raster_io import pil_to_array

        pixels, _ = pil_to_array(image)
        if pixels.dtype != np.uint8:
            raise ImageError(f"PIL image of mode {image.mode} is not 8-bit; load it with load_image and to_rgb")
        image = pixels
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageError(f"image array must be uint8 RGB, got {array.dtype} (window it with to_rgb first)")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        from PIL import Image

        rgba = Image.fromarray(array)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return array


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear (resample=2) resize of a uint8 RGB array to size x size."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size, size), resample=Image.BILINEAR))


def to_pixel_values(images, size: int = MEDGEMMA_SIZE):
    """torch.FloatTensor [N, 3, size, size] in [-1, 1] for one image or a sequence of images.

    Accepts uint8 RGB / gray arrays, a [N, H, W, 3] uint8 stack, PIL images and MedicalImage
    objects (converted with `to_rgb`, so CT windows and MR normalisation apply).
    """
    import torch

    if size < 1:
        raise ImageError(f"size must be positive, got {size}")
    batch = _as_batch(images)
    if not batch:
        raise ImageError("to_pixel_values: no images given")
    out = np.empty((len(batch), 3, size, size), dtype=np.float32)
    for index, image in enumerate(batch):
        resized = resize_square(pad_to_square(as_rgb_uint8(image)), size)
        out[index] = _TABLE[resized].transpose(2, 0, 1)
    return torch.from_numpy(out)


def to_resized_uint8(images, size: int = MEDGEMMA_SIZE):
    """torch.uint8 [N, 3, size, size]: `to_pixel_values` before its last step (x / 255 and the
    normalisation), a quarter of the memory; `normalize_pixels` finishes them bit-identically."""
    import torch

    if size < 1:
        raise ImageError(f"size must be positive, got {size}")
    batch = _as_batch(images)
    if not batch:
        raise ImageError("to_resized_uint8: no images given")
    out = np.empty((len(batch), 3, size, size), dtype=np.uint8)
    for index, image in enumerate(batch):
        out[index] = resize_square(pad_to_square(as_rgb_uint8(image)), size).transpose(2, 0, 1)
    return torch.from_numpy(out)


def normalize_pixels(pixels):
    """uint8 pixels (any shape) -> the float32 model input `to_pixel_values` gives for them."""
    import torch

    return torch.from_numpy(_TABLE).to(pixels.device)[pixels.long()]


def _as_batch(images) -> list:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, MedicalImage):
        if images.frames > 1:
            from openmedgemma.imaging.windowing import to_rgb

            return list(to_rgb(images))
        return [images]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        return list(images)
    return [images]
