"""Whole-slide image -> at most 126 non-overlapping tissue patches at one magnification.

MedGemma 1.5 pathology input: an HSV tissue mask computed at 5x, one magnification per slide,
non-overlapping patch x patch tiles (896 by default) on a grid anchored at the slide's top-left,
tiles kept when at least `min_tissue` of their area is tissue, spatial (row-major) order; when more
tiles qualify than `max_patches`, a seeded random subset is kept, still in spatial order. `tile_case`
tiles the several slides of one case under one cap, stratified by slide.

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


@dataclass(frozen=True)
class SlidePlan:
    """Where the tissue patches of one slide lie, before any patch is read (see `plan_slide`)."""

    source: str
    cells: list[tuple[int, int]]  # (row, column) grid cells that passed the tissue mask, row-major
    step: float  # patch footprint in level-0 pixels
    grid_shape: tuple[int, int]
    magnification: float
    base_magnification: float
    patch: int
    opened: object = None  # the slide object when one was passed in open (it stays open for its owner)


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
    plan = plan_slide(path, magnification, patch, min_tissue=min_tissue, max_pixels=max_pixels)
    if max_patches < 1:
        raise ImageError(f"{plan.source}: max_patches must be at least 1, got {max_patches}")
    return read_patches(plan, _subsample(plan.cells, max_patches, np.random.default_rng(seed)))


def tile_case(
    paths,
    magnification: float,
    max_patches: int = 126,
    patch: int = 896,
    seed: int = 0,
    *,
    min_tissue: float = 0.5,
    max_pixels: int | None = None,
) -> list[SlidePatches]:
    """Tile every slide of one case with at most `max_patches` patches in all.

    When more tissue patches qualify, each slide keeps a share proportional to its tissue patches
    (largest remainders; at least one per slide), drawn at random (seeded per slide) and kept in
    spatial order: a stratified subsample, so a small biopsy is not crowded out by a large resection.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ImageError("a slide case needs at least one slide file")
    if max_patches < len(paths):
        raise ImageError(f"max_patches {max_patches} is fewer than the {len(paths)} slides of the case "
                         "(one patch each at least)")
    plans = [plan_slide(p, magnification, patch, min_tissue=min_tissue, max_pixels=max_pixels) for p in paths]
    quotas = allocate([len(plan.cells) for plan in plans], max_patches)
    return [read_patches(plan, _subsample(plan.cells, quota, np.random.default_rng([seed, index])))
            for index, (plan, quota) in enumerate(zip(plans, quotas))]  # fmt: skip


def allocate(available: list[int], total: int) -> list[int]:
    """Per stratum, how many to keep of `available` so that at most `total` are kept: all when they fit,
    else shares of `total` proportional to `available` (largest remainders, ties to the earlier stratum),
    each at least 1 (taken back from the largest shares) and at most its `available`."""
    if sum(available) <= total:
        return list(available)
    exact = [total * n / sum(available) for n in available]
    quotas = [min(n, max(1 if n else 0, int(e))) for n, e in zip(available, exact)]
    while sum(quotas) > total:  # the at-least-one rule overshot
        quotas[max(range(len(quotas)), key=lambda i: (quotas[i], -i))] -= 1
    order = sorted(range(len(available)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    while sum(quotas) < total:
        for i in order:
            if sum(quotas) < total and quotas[i] < available[i]:
                quotas[i] += 1
    return quotas


def plan_slide(
    path,
    magnification: float,
    patch: int = 896,
    *,
    min_tissue: float = 0.5,
    max_pixels: int | None = None,
) -> SlidePlan:
    """The tissue cells of a slide's patch grid at `magnification` (no patch read yet). path: a slide file, a
    folder holding a DICOM whole-slide image, or an opened DicomSlide (imaging.dicom_slide, e.g. from DICOMweb)."""
    opened = not isinstance(path, (str, Path))
    name = path.name if opened else str(path)
    if patch < 1 or not 0.0 <= min_tissue <= 1.0 or not magnification > 0:
        raise ImageError(f"{name}: invalid tiling request (patch {patch}, min_tissue {min_tissue}, "
                         f"magnification {magnification})")  # fmt: skip
    slide = path if opened else _open(Path(path))
    try:
        base = base_magnification(slide, name)
        if magnification > base * (1 + 1e-6):
            raise ImageError(f"{name}: {magnification:g}x asked, the slide is scanned at {base:g}x (no upsampling)")
        width, height = slide.dimensions
        step = patch * base / magnification  # patch footprint in level-0 pixels
        grid = (int(height // step), int(width // step))
        if grid[0] == 0 or grid[1] == 0:
            raise ImageError(f"{name}: {width}x{height} slide is smaller than one {patch}px patch "
                             f"at {magnification:g}x")
        _check_level(slide, name, step / patch, f"{magnification:g}x patches", base)
        mask = tissue_mask(slide, name, base, max_pixels)
        fractions = cell_tissue_fractions(mask, grid, step * mask.shape[1] / width, step * mask.shape[0] / height)
        cells = [(int(r), int(c)) for r, c in np.argwhere(fractions >= min_tissue)]  # row-major order
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: slide cannot be read ({short_reason(err)})") from None
    finally:
        if not opened:
            slide.close()
    if not cells:
        raise ImageError(f"{name}: no tissue found: none of the {grid[0] * grid[1]} patches of the {grid[0]}x{grid[1]} "
                         f"grid at {magnification:g}x is {min_tissue:.0%} tissue (HSV saturation >= {SATURATION_MIN}, "
                         f"value >= {VALUE_MIN})")  # fmt: skip
    return SlidePlan(name, cells, step, grid, float(magnification), base, patch, path if opened else None)


def read_patches(plan: SlidePlan, cells: list[tuple[int, int]]) -> SlidePatches:
    """The patches of `cells` (in the order given) as uint8 [patch, patch, 3] arrays."""
    name, step = plan.source, plan.step
    coordinates = [(int(round(c * step)), int(round(r * step))) for r, c in cells]
    slide = plan.opened or _open(Path(name))
    try:
        patches = [_read_patch(slide, name, xy, step, plan.patch) for xy in coordinates]
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: slide cannot be read ({short_reason(err)})") from None
    finally:
        if plan.opened is None:
            slide.close()
    return SlidePatches(patches, coordinates, plan.magnification, plan.base_magnification, plan.grid_shape,
                        len(plan.cells), name)  # fmt: skip


MAX_LEVEL_OVERREAD = 4.0  # a read may come from a level at most this much finer than needed


def _check_level(slide, name: str, downsample: float, what: str, base: float) -> None:
    """A level close enough to `downsample` exists: reading a far finer one would take far more memory."""
    level = slide.get_best_level_for_downsample(downsample)
    have = slide.level_downsamples[level]
    if downsample / have > MAX_LEVEL_OVERREAD:
        levels = ", ".join(f"{base / d:g}x" for d in slide.level_downsamples)
        raise ImageError(f"{name}: no pyramid level for {what} ({base / downsample:g}x): the nearest is "
                         f"{base / have:g}x, {downsample / have:.0f}x finer (levels: {levels}); write the slide "
                         "with a pyramid")  # fmt: skip


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
        levels = ", ".join(f"{w}x{h}" for w, h in slide.level_dimensions)
        raise ImageError(f"{name}: no pyramid level small enough for the {MASK_MAGNIFICATION:g}x tissue mask: "
                         f"the nearest, {level_size[0]}x{level_size[1]}, exceeds {limit:,} samples (levels: {levels}); "
                         "write the slide with a pyramid")  # fmt: skip
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


def _subsample(cells: list, max_patches: int, rng: np.random.Generator) -> list:
    if len(cells) <= max_patches:
        return cells
    keep = np.sort(rng.choice(len(cells), size=max_patches, replace=False))
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
