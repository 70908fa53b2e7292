"""X-rays (PNG, CR DICOM with MONOCHROME1 and windows, VOI LUT), 16-bit images, colour, TIFF."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_image, to_rgb


def standard_linear_window(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.2.1, written as the standard's if / else if / else, output 0..255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0


def test_png_xrays_load_as_8bit_gray_and_pass_through(cxr_pngs):
    assert len(cxr_pngs) == 2
    for path in cxr_pngs:
        with Image.open(path) as im:
            reference = np.array(im.convert("L"))
            assert im.mode == "L"
        image = load_image(path)
        assert image.file_format == "png" and image.photometric == "MONOCHROME2"
        assert image.pixels.shape == (512, 512) and image.pixels.dtype == np.uint8
        np.testing.assert_array_equal(image.pixels, reference)
        rgb = to_rgb(image)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], reference)


def test_png_with_modality_given(cxr_pngs):
    assert load_image(cxr_pngs[0], modality="cr").modality == "CR"


def test_cr_monochrome1_uses_its_window_then_inverts(cr_file):
    ds = pydicom.dcmread(cr_file)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PixelRepresentation == 0
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    assert raw.max() < 2**ds.BitsStored
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.empty(raw.shape, dtype=np.uint8)
    for (r, c), stored in np.ndenumerate(raw):
        expected[r, c] = 255 - int(np.round(standard_linear_window(stored * slope + intercept, center, width)))
    image = load_image(cr_file)
    assert (image.window_center, image.window_width) == (center, width)
    rgb = to_rgb(image)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert len(np.unique(expected)) > 20


def _cr_dataset(pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def test_voi_lut_sequence_wins_over_full_range(tmp_path):
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    ds = _cr_dataset(pixels)
    item = Dataset()
    first, entries = 1000, 2048
    table = (np.sqrt(np.arange(entries) / (entries - 1)) * 4095).astype(np.uint16)  # gamma-like
    item.add_new("LUTDescriptor", "US", [entries, first, 12])
    item.add_new("LUTData", "US", table.tolist())
    ds.VOILUTSequence = [item]
    path = tmp_path / "voilut.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = load_image(path)
    assert image.has_voi_lut
    expected = np.empty(pixels.shape, dtype=np.uint8)
    for (r, c), value in np.ndenumerate(pixels):
        index = min(max(int(value) - first, 0), entries - 1)
        expected[r, c] = int(np.round(table[index] / 4095 * 255))
    np.testing.assert_array_equal(to_rgb(image)[..., 1], expected)


def test_dx_without_window_uses_full_range(tmp_path):
    pixels = (np.arange(32 * 32).reshape(32, 32) * 3 + 100).astype(np.uint16)
    path = tmp_path / "dx.dcm"
    _cr_dataset(pixels).save_as(path, enforce_file_format=True)
    rgb = to_rgb(load_image(path))
    lo, hi = pixels.min(), pixels.max()
    expected = np.round((pixels.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 2], expected)


def test_sixteen_bit_png_and_tiff(tmp_path):
    pixels = (np.arange(40 * 30).reshape(40, 30) * 37 % 60000 + 500).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x16.png")
    tifffile.imwrite(tmp_path / "x16.tif", pixels)
    expected = np.round((pixels.astype(np.float64) - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)
    for name in ("x16.png", "x16.tif"):
        image = load_image(tmp_path / name)
        assert image.pixels.dtype == np.uint16
        np.testing.assert_array_equal(image.pixels, pixels)
        np.testing.assert_array_equal(to_rgb(image)[..., 0], expected)


def test_tiff_rgb_minis_white_and_multipage(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(to_rgb(load_image(tmp_path / "rgb.tif")), rgb)
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    tifffile.imwrite(tmp_path / "white.tif", gray, photometric="miniswhite")
    white = load_image(tmp_path / "white.tif")
    assert white.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(to_rgb(white)[..., 0], 255 - gray)
    stack = np.stack([gray, gray[::-1]])
    tifffile.imwrite(tmp_path / "pages.tif", stack, photometric="minisblack")
    pages = load_image(tmp_path / "pages.tif")
    assert pages.pixels.shape == (2, 20, 30) and to_rgb(pages).shape == (2, 20, 30, 3)


def test_jpeg_and_rgba_png(tmp_path):
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[:, :12] = (200, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    with Image.open(tmp_path / "photo.jpg") as im:
        reference = np.array(im.convert("RGB"))
    image = load_image(tmp_path / "photo.jpg")
    assert image.file_format == "jpeg" and image.is_colour
    np.testing.assert_array_equal(to_rgb(image), reference)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    out = to_rgb(load_image(tmp_path / "alpha.png"))
    assert (out[:4] == (255, 0, 0)).all() and (out[4:] == (255, 255, 255)).all()


def _secondary_capture(rgb: np.ndarray, photometric: str, data: bytes, syntax) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = data
    return ds


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (12, 10, 3)).astype(np.float64)
    # PS3.3 C.7.6.3.1.2 YBR_FULL from RGB, computed here
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    cb = -0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2] + 128
    cr = 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2] + 128
    ybr = np.clip(np.round(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)
    path = tmp_path / "ybr.dcm"
    _secondary_capture(ybr, "YBR_FULL", ybr.tobytes(), pydicom.uid.ExplicitVRLittleEndian).save_as(path, enforce_file_format=True)
    image = load_image(path)
    assert image.photometric == "YBR_FULL" and image.is_colour
    out = to_rgb(image)
    assert out.shape == (12, 10, 3) and np.abs(out.astype(int) - rgb.astype(int)).max() <= 2


def test_jpeg_baseline_ybr_422_secondary_capture(tmp_path):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, :16] = (240, 20, 20)
    rgb[:, 16:] = (20, 20, 240)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    frame = buffer.getvalue()
    data = pydicom.encaps.encapsulate([frame])
    path = tmp_path / "jpeg.dcm"
    _secondary_capture(rgb, "YBR_FULL_422", data, pydicom.uid.JPEGBaseline8Bit).save_as(path, enforce_file_format=True)
    with Image.open(io.BytesIO(frame)) as im:
        reference = np.array(im.convert("RGB")).astype(int)
    out = to_rgb(load_image(path)).astype(int)
    assert np.abs(out - reference).max() <= 3  # two JPEG decoders (libjpeg vs Pillow's) may differ by rounding
    with pytest.raises(ImageError, match="grayscale"):
        to_rgb(load_image(path), "medgemma")


def test_explicit_window_on_monochrome1_cr_is_inverted(cr_file):
    """An explicit window replaces the file's window, not the photometric meaning: MONOCHROME1 is still inverted."""
    image = load_image(cr_file)
    assert image.photometric == "MONOCHROME1" and image.modality == "CR"
    values = image.modality_values()
    low, high = np.percentile(values, 10), np.percentile(values, 90)
    expected = np.empty(values.shape, dtype=np.uint8)
    for index, v in np.ndenumerate(values):  # the CT formula written out per pixel, then the inversion
        expected[index] = 255 - int(np.round((min(max(float(v), low), high) - low) / (high - low) * 255))
    rgb = to_rgb(image, [(low, high)])
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert len(np.unique(expected)) > 20
