"""Whole-slide image -> at most 126 non-overlapping tissue patches at one magnification.

MedGemma 1.5 pathology input: an HSV tissue mask computed at 5x, one magnification per slide,
non-overlapping patch x patch tiles (896 by default) on a grid anchored at the slide's top-left,
tiles kept when at least `min_tissue` of their area is tissue, spatial (row-major) order; when more
tiles qualify than `max_patches`, a seeded random subset is kept, still in spatial order.

Tissue: HSV saturation >= 25 and value >= 50 (0..255 scale): glass background is bright and
unsaturated, stained tissue is saturated, and black borders / markings are dark.
Magnification comes from the slide's objective power, else from its microns per pixel
(10x ~ 1.0 um/px). Slides are read with tiffslide (SVS, generic pyramidal TIFF, ...); a folder holding a
DICOM whole-slide image, or a slide already opened from a DICOMweb store, with wsidicom (imaging.dicom_slide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_io import short_reason
from openmedgemma.imaging.sniff import DEFAULT_MAX_PIXELS, read_head

SATURATION_MIN = 25
VALUE_MIN = 50
MASK_MAGNIFICATION = 5.0


@dataclass(frozen=True)
class SlidePatches:
    """patches: uint8 [patch, patch, 3] in spatial order; coordinates: their level-0 (x, y)."""

    patches: list[np.ndarray]
    coordinates: list[tuple[int, int]]
    magnification: float
    base_magnification: float
    grid_shape: tuple[int, int]  # (rows, columns) of the whole patch grid
    tissue_patches: int  # grid cells that passed the tissue mask, before the cap
    source: str


def tile_slide(
    path,
    magnification: float,
    max_patches: int = 126,
    patch: int = 896,
    seed: int = 0,
    *,
    min_tissue: float = 0.5,
    max_pixels: int | None = None,
) -> SlidePatches:
    opened = not isinstance(path, (str, Path))  # a DicomSlide (imaging.dicom_slide), e.g. from DICOMweb
    name = path.name if opened else str(path)
    if patch < 1 or max_patches < 1 or not 0.0 <= min_tissue <= 1.0 or not magnification > 0:
        raise ImageError(f"{name}: invalid tiling request (patch {patch}, max_patches {max_patches}, "
                         f"min_tissue {min_tissue}, magnification {magnification})")
    slide = path if opened else _open(Path(path))
    try:
        base = base_magnification(slide, name)
        if magnification > base * (1 + 1e-6):
            raise ImageError(f"{name}: {magnification:g}x asked, the slide is scanned at {base:g}x (no upsampling)")
        width, height = slide.dimensions
        step = patch * base / magnification  # patch footprint in level-0 pixels
        grid = (int(height // step), int(width // step))
        if grid[0] == 0 or grid[1] == 0:
            raise ImageError(f"{name}: {width}x{height} slide is smaller than one {patch}px patch at {magnification:g}x")
        mask = tissue_mask(slide, name, base, max_pixels)
        fractions = cell_tissue_fractions(mask, grid, step * mask.shape[1] / width, step * mask.shape[0] / height)
        cells = [tuple(rc) for rc in np.argwhere(fractions >= min_tissue)]  # row-major order
        chosen = _subsample(cells, max_patches, seed)
        coordinates = [(int(round(c * step)), int(round(r * step))) for r, c in chosen]
        patches = [_read_patch(slide, name, xy, step, patch) for xy in coordinates]
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: slide cannot be read ({short_reason(err)})") from None
    finally:
        if not opened:  # a slide passed in open stays open for its owner
            slide.close()
    return SlidePatches(patches, coordinates, float(magnification), base, grid, len(cells), name)


def _open(path: Path):
    import tiffslide

    name = str(path)
    if path.is_dir():
        from openmedgemma.imaging.dicom_slide import open_folder_slide

        return open_folder_slide(path)
    read_head(path)  # missing / empty file -> ImageError
    try:
        return tiffslide.TiffSlide(name)
    except Exception as err:
        raise ImageError(f"{name}: not a readable whole-slide image ({short_reason(err)})") from None


def base_magnification(slide, name: str) -> float:
    power = slide.properties.get("tiffslide.objective-power")
    if power:
        return float(power)
    mpp = slide.properties.get("tiffslide.mpp-x")
    if mpp and float(mpp) > 0:
        return 10.0 / float(mpp)
    raise ImageError(f"{name}: no objective power and no microns-per-pixel in the slide: magnification unknown")


def tissue_mask(slide, name: str, base: float, max_pixels: int | None) -> np.ndarray:
    """Boolean mask of the whole slide at MASK_MAGNIFICATION (or the base, if lower)."""
    from PIL import Image

    downsample = max(1.0, base / MASK_MAGNIFICATION)
    width, height = slide.dimensions
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    level = slide.get_best_level_for_downsample(downsample)
    level_size = slide.level_dimensions[level]
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if level_size[0] * level_size[1] * 3 > limit:
        raise ImageError(f"{name}: the {level_size[0]}x{level_size[1]} level read for the tissue mask exceeds {limit:,} samples")
    region = slide.read_region((0, 0), level, level_size).convert("RGB")
    if region.size != size:
        region = region.resize(size, resample=Image.BILINEAR)
    hsv = np.asarray(region.convert("HSV"))
    return (hsv[..., 1] >= SATURATION_MIN) & (hsv[..., 2] >= VALUE_MIN)


def cell_tissue_fractions(mask: np.ndarray, grid: tuple[int, int], step_x: float, step_y: float) -> np.ndarray:
    """Fraction of tissue pixels in each grid cell (cells given in mask pixels, rounded)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    ys = np.minimum(np.round(np.arange(grid[0] + 1) * step_y).astype(int), mask.shape[0])
    xs = np.minimum(np.round(np.arange(grid[1] + 1) * step_x).astype(int), mask.shape[1])
    area = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)
    total = integral[np.ix_(ys[1:], xs[1:])] - integral[np.ix_(ys[:-1], xs[1:])]
    total = total - integral[np.ix_(ys[1:], xs[:-1])] + integral[np.ix_(ys[:-1], xs[:-1])]
    return np.divide(total, area, out=np.zeros_like(area), where=area > 0)


def _subsample(cells: list, max_patches: int, seed: int) -> list:
    if len(cells) <= max_patches:
        return cells
    keep = np.sort(np.random.default_rng(seed).choice(len(cells), size=max_patches, replace=False))
    return [cells[i] for i in keep]


def _read_patch(slide, name: str, xy: tuple[int, int], step: float, patch: int) -> np.ndarray:
    from PIL import Image

    level = slide.get_best_level_for_downsample(step / patch)
    level_downsample = slide.level_downsamples[level]
    side = max(1, int(math.ceil(step / level_downsample - 1e-6)))
    region = slide.read_region(xy, level, (side, side)).convert("RGB")
    if region.size != (patch, patch):
        region = region.resize((patch, patch), resample=Image.BILINEAR)
    return np.asarray(region)
