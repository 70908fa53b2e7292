"""PNG / JPEG (Pillow) and TIFF (tifffile) -> MedicalImage.

8- and 16-bit grayscale stay grayscale (MONOCHROME2, or MONOCHROME1 for a min-is-white TIFF);
colour becomes RGB. Transparency is composited onto white, as transformers' `convert_rgb` and
skimage's `rgba2rgb` (used by the official notebooks) do. EXIF orientation is not applied,
matching transformers' image processors.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_io import short_reason
from openmedgemma.imaging.image import MedicalImage
from openmedgemma.imaging.sniff import check_pixel_count, describe


def _open(source: str | Path | bytes):
    return io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source


def load_pil_image(source: str | Path | bytes, file_format: str, *, max_pixels: int | None = None) -> MedicalImage:
    from PIL import Image

    name = describe(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_open(source)) as im:
                width, height = im.size
                check_pixel_count(name, width * height * len(im.getbands()), max_pixels)
                im.load()
                pixels, photometric = pil_to_array(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: refused by Pillow's decompression-bomb limit ({err})") from None
    except Exception as err:  # truncated / corrupt streams raise OSError, SyntaxError, ValueError...
        raise ImageError(f"{name}: corrupt or truncated {file_format.upper()} ({short_reason(err)})") from None
    return MedicalImage(pixels=pixels, modality="", photometric=photometric, source=name, file_format=file_format)


def pil_to_array(im) -> tuple[np.ndarray, str]:
    """(pixels, photometric) of a loaded PIL image: gray stays gray, the rest becomes RGB."""
    from PIL import Image

    mode = im.mode
    if mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.array(im)
        if mode == "I;16B" or pixels.dtype.byteorder == ">":
            pixels = pixels.astype(pixels.dtype.newbyteorder("="))
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            raise ImageError("pixel data contains NaN or infinite values")
        return pixels, "MONOCHROME2"
    if mode == "1":
        return np.array(im.convert("L")), "MONOCHROME2"
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB")), "RGB"
    return np.array(im.convert("RGB")), "RGB"


def load_tiff(source: str | Path | bytes, *, max_pixels: int | None = None) -> MedicalImage:
    import tifffile

    name = describe(source)
    try:
        with tifffile.TiffFile(_open(source)) as tif:
            series = tif.series[0]
            count = int(np.prod(series.shape))
            hint = " (a whole-slide pyramid: use tile_slide)" if len(series.levels) > 1 else ""
            check_pixel_count(name + hint, count, max_pixels)
            page = series.pages[0]
            photometric = page.photometric.name if page.photometric is not None else "MINISBLACK"
            pixels = series.asarray()
            axes = series.axes
            colormap = page.colormap
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: corrupt or truncated TIFF ({short_reason(err)})") from None
    pixels, photometric = _tiff_layout(name, pixels, axes, photometric, colormap)
    return MedicalImage(pixels=pixels, modality="", photometric=photometric, source=name, file_format="tiff")


def _tiff_layout(name: str, pixels: np.ndarray, axes: str, photometric: str, colormap) -> tuple[np.ndarray, str]:
    if "S" in axes:  # samples (channels) last
        pixels = np.moveaxis(pixels, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    keep = [i for i, axis in enumerate(axes) if axis in "YXS" or pixels.shape[i] > 1]
    pixels = pixels.reshape([pixels.shape[i] for i in keep])
    spatial = sum(axis not in "S" for axis in (axes[i] for i in keep))
    if spatial not in (2, 3):
        raise ImageError(f"{name}: TIFF with axes {axes!r} has {spatial} image dimensions; expected 2 or 3")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageError(f"{name}: pixel data contains NaN or infinite values")
    if photometric == "PALETTE":
        if colormap is None:
            raise ImageError(f"{name}: palette TIFF without a colour map")
        rgb = np.moveaxis(colormap[:, pixels], 0, -1)
        return (rgb >> 8).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8), "RGB"
    if photometric in ("MINISBLACK", "MINISWHITE") and "S" not in axes:
        return pixels, "MONOCHROME1" if photometric == "MINISWHITE" else "MONOCHROME2"
    if photometric == "RGB" and pixels.shape[-1] in (3, 4):
        if pixels.shape[-1] == 4:  # composite the alpha sample onto white
            if pixels.dtype != np.uint8:
                raise ImageError(f"{name}: RGBA TIFF of type {pixels.dtype} is not supported")
            alpha = pixels[..., 3:4].astype(np.float64) / 255.0
            pixels = np.round(pixels[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return np.ascontiguousarray(pixels), "RGB"
    raise ImageError(f"{name}: TIFF photometric {photometric} with shape {pixels.shape} is not supported")
