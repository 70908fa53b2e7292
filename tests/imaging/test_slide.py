"""tile_slide on small pyramidal TIFFs written here, with a known tissue rectangle."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from openmedgemma.errors import ImageError
from openmedgemma.imaging import tile_slide

BACKGROUND = (235, 235, 238)  # glass: bright, unsaturated
TISSUE = (190, 80, 160)  # H&E-like pink / purple: saturated


def write_slide(path, base: np.ndarray, mpp: float = 0.5, aperio: bool = True, levels=(1, 4, 16)) -> None:
    with tifffile.TiffWriter(path) as tif:
        for index, factor in enumerate(levels):
            level = np.asarray(Image.fromarray(base).reduce(factor)) if factor > 1 else base
            tile = 256 if min(level.shape[:2]) >= 256 else 16
            tif.write(
                level, tile=(tile, tile), photometric="rgb", compression="zlib",
                resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)), resolutionunit="CENTIMETER",
                subfiletype=1 if index else 0,
                description=f"Aperio Image Library |AppMag = {10 / mpp:g}|MPP = {mpp}" if aperio and index == 0 else None,
            )


@pytest.fixture
def slide(tmp_path):
    """20x slide, 2048 x 1536 px at level 0; tissue in x [512, 1536), y [256, 1280)."""
    base = np.empty((1536, 2048, 3), dtype=np.uint8)
    base[:] = BACKGROUND
    base[256:1280, 512:1536] = TISSUE
    rng = np.random.default_rng(0)
    base[256:1280, 512:1536] += rng.integers(0, 20, (1024, 1024, 3), dtype=np.uint8)  # texture
    path = tmp_path / "slide.tif"
    write_slide(path, base)
    return path, base


def expected_cells(step: int, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Grid cells (row, col) whose footprint is at least half inside the tissue rectangle."""
    cells = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            x0, y0 = c * step, r * step
            overlap_x = max(0, min(x0 + step, 1536) - max(x0, 512))
            overlap_y = max(0, min(y0 + step, 1280) - max(y0, 256))
            if overlap_x * overlap_y >= 0.5 * step * step:
                cells.append((r, c))
    return cells


def test_patches_at_base_magnification_cover_the_tissue_in_spatial_order(slide):
    path, base = slide
    result = tile_slide(path, magnification=20, patch=256)
    assert result.base_magnification == 20 and result.grid_shape == (6, 8)
    cells = expected_cells(256, (6, 8))
    assert result.coordinates == [(c * 256, r * 256) for r, c in cells]
    assert result.tissue_patches == len(cells) == 16
    for (x, y), patch in zip(result.coordinates, result.patches):
        assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        np.testing.assert_array_equal(patch, base[y:y + 256, x:x + 256])


def test_lower_magnification_reads_the_pyramid_and_resizes(slide):
    path, base = slide
    result = tile_slide(path, magnification=5, patch=128)  # one 128 px patch = 512 level-0 px
    assert result.grid_shape == (3, 4)
    cells = expected_cells(512, (3, 4))
    assert result.coordinates == [(c * 512, r * 512) for r, c in cells] and len(cells) == 6
    level2 = np.asarray(Image.fromarray(base).reduce(4))  # the 5x level written above
    for (x, y), patch in zip(result.coordinates, result.patches):
        np.testing.assert_array_equal(patch, level2[y // 4:y // 4 + 128, x // 4:x // 4 + 128])


def test_cap_subsamples_reproducibly_and_keeps_order(slide):
    path, _ = slide
    full = tile_slide(path, magnification=20, patch=128)
    assert full.tissue_patches == 64
    first = tile_slide(path, magnification=20, patch=128, max_patches=10, seed=3)
    again = tile_slide(path, magnification=20, patch=128, max_patches=10, seed=3)
    other = tile_slide(path, magnification=20, patch=128, max_patches=10, seed=4)
    assert len(first.patches) == 10 and first.coordinates == again.coordinates
    assert first.coordinates != other.coordinates
    assert set(first.coordinates) <= set(full.coordinates)
    order = [full.coordinates.index(xy) for xy in first.coordinates]
    assert order == sorted(order)
    rng = np.random.default_rng(3)
    picked = np.sort(rng.choice(64, size=10, replace=False))
    assert first.coordinates == [full.coordinates[i] for i in picked]


def test_default_patch_size_is_896(slide):
    path, base = slide
    result = tile_slide(path, magnification=20)
    assert result.grid_shape == (1, 2)
    assert result.coordinates == [(896, 0)]  # x [896, 1792) overlaps tissue [512, 1536) on 640 px
    assert result.patches[0].shape == (896, 896, 3)


def test_magnification_from_microns_per_pixel(tmp_path):
    base = np.empty((512, 512, 3), dtype=np.uint8)
    base[:] = TISSUE
    write_slide(tmp_path / "generic.tif", base, mpp=0.25, aperio=False, levels=(1, 4))
    result = tile_slide(tmp_path / "generic.tif", magnification=20, patch=128)
    assert result.base_magnification == pytest.approx(40)
    assert len(result.patches) == 4 and result.grid_shape == (2, 2)


def test_slide_errors(slide, tmp_path):
    path, _ = slide
    with pytest.raises(ImageError, match="slide.tif: 40x asked, the slide is scanned at 20x"):
        tile_slide(path, magnification=40)
    with pytest.raises(ImageError, match="smaller than one"):
        tile_slide(path, magnification=1)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.svs: empty file"):
        tile_slide(tmp_path / "empty.svs", magnification=20)
    (tmp_path / "text.svs").write_text("not a slide")
    with pytest.raises(ImageError, match="text.svs: not a readable whole-slide image"):
        tile_slide(tmp_path / "text.svs", magnification=20)
