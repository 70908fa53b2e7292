"""to_pixel_values: zero-pad to square, then exactly transformers' Gemma3ImageProcessor.

transformers 5 routes `Gemma3ImageProcessor` to its torchvision backend when torchvision is
installed and falls back to the PIL backend (`Gemma3ImageProcessorPil`) otherwise; the Hub
config asks for `resample: 2` (PIL bilinear), so the PIL backend is the reference here. The
comparison is exact (atol 0): both sides resize the same uint8 image with Pillow and apply the
same float64 rescale and float32 normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # test-only oracle

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_image, pad_to_square, to_pixel_values, to_rgb


def hub_processor(size: int) -> Gemma3ImageProcessorPil:
    """The settings of MedGemma's preprocessor_config.json (size from the model)."""
    return Gemma3ImageProcessorPil(
        size={"height": size, "width": size},
        resample=2,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )


def reference(images, size):
    padded = [pad_to_square(np.asarray(image)) for image in images]
    return hub_processor(size)(padded, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [896, 448])
@pytest.mark.parametrize("shape", [(128, 128, 3), (300, 200, 3), (97, 333, 3), (1000, 701, 3)])
def test_parity_with_gemma3_image_processor(size, shape):
    rng = np.random.default_rng(sum(shape) + size)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = to_pixel_values([image], size=size)
    expected = reference([image], size)
    assert ours.shape == expected.shape == (1, 3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_parity_on_real_images(ct_small, cxr_pngs):
    ct_rgb = to_rgb(load_image(ct_small))
    cxr_rgb = to_rgb(load_image(cxr_pngs[0]))
    ours = to_pixel_values([load_image(ct_small), cxr_rgb])
    torch.testing.assert_close(ours, reference([ct_rgb, cxr_rgb], 896), rtol=0, atol=0)
    assert ours.min() >= -1 and ours.max() <= 1


def test_pil_gray_and_rgba_inputs_follow_do_convert_rgb():
    gray = Image.fromarray(np.arange(60 * 40, dtype=np.uint16).reshape(60, 40).astype(np.uint8))
    rgba = np.zeros((30, 50, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[:15, :, 3] = 255
    rgba_image = Image.fromarray(rgba)
    ours = to_pixel_values([gray, rgba_image], size=448)
    # the processor's convert_rgb: gray -> RGB, alpha composited onto white; then our zero pad
    gray_rgb = np.array(gray.convert("RGB"))
    white = Image.new("RGBA", rgba_image.size, (255, 255, 255, 255))
    rgba_rgb = np.array(Image.alpha_composite(white, rgba_image).convert("RGB"))
    torch.testing.assert_close(ours, reference([gray_rgb, rgba_rgb], 448), rtol=0, atol=0)


def test_pad_to_square_is_centred_zero_padding():
    image = np.full((2, 5, 3), 9, dtype=np.uint8)
    padded = pad_to_square(image)
    assert padded.shape == (5, 5, 3)
    assert (padded[1:3] == 9).all() and (padded[0] == 0).all() and (padded[3:] == 0).all()
    tall = pad_to_square(np.ones((4, 1), dtype=np.uint8))
    np.testing.assert_array_equal(tall, [[0, 1, 0, 0]] * 4)
    square = np.ones((3, 3), dtype=np.uint8)
    assert pad_to_square(square) is square


def test_stack_and_volume_inputs(pacsman_series):
    from openmedgemma.imaging import load_series, sample_slices

    sampled = sample_slices(load_series(pacsman_series), max_slices=4)
    rgb = to_rgb(sampled)
    from_stack = to_pixel_values(rgb, size=64)
    from_volume = to_pixel_values(sampled, size=64)
    assert from_stack.shape == (4, 3, 64, 64)
    torch.testing.assert_close(from_stack, from_volume, rtol=0, atol=0)
    torch.testing.assert_close(from_stack, reference(list(rgb), 64), rtol=0, atol=0)


def test_bad_arrays_are_refused():
    with pytest.raises(ImageError, match="uint8"):
        to_pixel_values([np.zeros((4, 4, 3), dtype=np.float32)])
    with pytest.raises(ImageError, match=r"\[H, W, 3\]"):
        to_pixel_values([np.zeros((4, 4, 2), dtype=np.uint8)])
    with pytest.raises(ImageError, match="no images"):
        to_pixel_values([])
