"""MedicalImage -> uint8 RGB, the way MedGemma saw each modality in training.

- CT: Hounsfield units, three windows into R, G, B; each clipped, scaled to 0..255 and rounded,
  computed in float32 in the order of the official CT notebook (clip, -low, /width, *255, round
  half to even). Presets: "medgemma" (default, notebook / 1.5 report) and "report-v4".
- MR: min-max over the whole volume (`intensity_range` survives slice sampling), R = G = B;
  a constant volume maps to 255 as in the official DICOM handler.
- Other grayscale (CR, DX, PNG X-rays, ...): the file's VOI LUT, else its window (PS3.3 C.11.2.1.2
  LINEAR / LINEAR_EXACT / SIGMOID, first window when several), else 8-bit values unchanged, else
  min-max; MONOCHROME1 is then inverted.
- Colour: passed through (YBR and palette colour were converted to RGB when loading); 16-bit
  colour is scaled by 255 / 65535.
Custom windows: a list of (low, high) pairs, three for R, G, B or one for a grayscale image,
applied to modality values (HU for CT) with the CT formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.image import MedicalImage

Window = tuple[float, float]

PRESETS: dict[str, tuple[Window, Window, Window]] = {
    # MedGemma 1.5 report and the official CT notebook.
    "medgemma": ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0)),
    # MedGemma report v4 text: width/level 2250/-100, 350/40, 80/40. The official DICOM handler's
    # G window [135, 215] is a lost minus sign and is deliberately not reproduced.
    "report-v4": ((-1225.0, 1025.0), (-135.0, 215.0), (0.0, 80.0)),
}
DEFAULT_CT_PRESET = "medgemma"


def to_rgb(image: MedicalImage, preset: str | Sequence[Window] | None = None) -> np.ndarray:
    """uint8 RGB: [H, W, 3] for a 2-D image, [N, H, W, 3] for frames or a volume.

    preset: a name from PRESETS (CT only) or a list of (low, high) windows (three for R, G, B,
    or one for gray), applied to modality values. None picks the modality's default.
    """
    if image.is_colour:
        if preset is not None:
            raise ImageError(f"{image.source}: windows apply to grayscale images, this one is {image.photometric}")
        return colour_to_uint8(image)
    windows = resolve_windows(image, preset)
    if windows is not None:
        values = image.modality_values()
        channels = [window_channel(values, low, high) for low, high in windows]
        rgb = np.stack(channels * (3 // len(channels)), axis=-1)
        return rgb if image.modality == "CT" else _invert_if_monochrome1(image, rgb)
    if image.modality == "MR":
        gray = min_max(image.modality_values(), image.intensity_range)
    else:
        gray = _invert_if_monochrome1(image, display_gray(image))
    return np.repeat(gray[..., None], 3, axis=-1)


def resolve_windows(image: MedicalImage, preset) -> list[Window] | None:
    if preset is None:
        return list(PRESETS[DEFAULT_CT_PRESET]) if image.modality == "CT" else None
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ImageError(f"{image.source}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if image.modality != "CT":
            modality = image.modality or "unknown"
            raise ImageError(
                f"{image.source}: preset {preset!r} holds Hounsfield-unit windows for CT; this image's "
                f"modality is {modality} (pass explicit windows instead)"
            )
        return list(PRESETS[preset])
    windows = [tuple(float(v) for v in window) for window in preset]
    if len(windows) not in (1, 3) or any(len(w) != 2 for w in windows):
        raise ImageError(f"{image.source}: give three (low, high) windows for R, G, B, or one for gray")
    for low, high in windows:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ImageError(f"{image.source}: window ({low:g}, {high:g}) needs finite low < high")
    return windows


def window_channel(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high], scale to 0..255, round (the official CT notebook, float32)."""
    scaled = np.clip(values, low, high).astype(np.float32)
    scaled -= low
    scaled /= high - low
    scaled *= 255.0
    return np.round(scaled).astype(np.uint8)


def min_max(values: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(x - min) / (max - min) * 255, rounded; a constant input maps to 255 (official handler)."""
    low, high = value_range if value_range is not None else (float(values.min()), float(values.max()))
    if high == low:
        return np.full(values.shape, 255, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) / (high - low) * 255.0
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def display_gray(image: MedicalImage) -> np.ndarray:
    """Grayscale uint8 from the file's VOI LUT or window, else raw 8-bit, else min-max."""
    if image.voi_lut is not None:
        return apply_voi_lut(image.modality_values(), image.voi_lut.first_mapped, image.voi_lut.table, image.voi_lut.bits)
    if image.window_center is not None and image.window_width is not None:
        return apply_window(image.modality_values(), image.window_center, image.window_width, image.voi_lut_function)
    slope, intercept = image.rescale_slope, image.rescale_intercept
    trivial_rescale = np.all(np.asarray(1.0 if slope is None else slope) == 1.0) and np.all(
        np.asarray(0.0 if intercept is None else intercept) == 0.0
    )
    if image.pixels.dtype == np.uint8 and trivial_rescale:
        return image.pixels
    return min_max(image.modality_values())


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window onto 0..255, rounded."""
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0
    else:  # LINEAR: the classic window, defined with c - 0.5 and w - 1
        if width == 1:
            y = np.where(x <= center - 0.5, 0.0, 255.0)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    return np.round(y).astype(np.uint8)


def apply_voi_lut(values: np.ndarray, first_mapped: int, table: np.ndarray, bits: int) -> np.ndarray:
    """VOI LUT: values below the first mapped one take entry 0, above the last take the last."""
    index = np.clip(np.round(values).astype(np.int64) - first_mapped, 0, len(table) - 1)
    out = table[index].astype(np.float64) / float(2**bits - 1) * 255.0
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def colour_to_uint8(image: MedicalImage) -> np.ndarray:
    pixels = image.pixels
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.round(pixels.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    raise ImageError(f"{image.source}: colour pixels of type {pixels.dtype} are not supported (8 or 16 bit)")


def _invert_if_monochrome1(image: MedicalImage, display: np.ndarray) -> np.ndarray:
    return 255 - display if image.photometric == "MONOCHROME1" else display
