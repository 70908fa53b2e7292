"""CT: Hounsfield units and the three-window RGB, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from openmedgemma.errors import ImageError
from openmedgemma.imaging import PRESETS, load_image, to_rgb


def stored_and_hu(path):
    """Raw stored values straight from the Pixel Data bytes, and HU, without our code."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
    hu = raw.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert float(ds.RescaleSlope) == int(ds.RescaleSlope)  # integer HU: exact arithmetic below
    return raw, hu


def exact_window(hu: np.ndarray, low: int, high: int):
    """Exact rational (clip(hu) - low) * 255 / (high - low), rounded half to even, and a mask of
    exact ties (where float rounding may legitimately go either way)."""
    numerator = (np.clip(hu, low, high) - low) * 255
    quotient, remainder = np.divmod(numerator, high - low)
    twice = 2 * remainder
    up = (twice > high - low) | ((twice == high - low) & (quotient % 2 == 1))
    return (quotient + up).astype(np.uint8), twice == high - low


def notebook_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """The official CT notebook's norm() + np.round, restated here."""
    x = np.clip(hu.astype(np.float64), low, high).astype(np.float32)
    x -= low
    x /= high - low
    x *= 255.0
    return np.round(x, 0).astype(np.uint8)


def test_ct_small_loads_stored_values_and_rescale(ct_small):
    raw, _ = stored_and_hu(ct_small)
    image = load_image(ct_small)
    assert image.modality == "CT" and image.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(image.pixels, raw)
    assert (image.rescale_slope, image.rescale_intercept) == (1.0, -1024.0)
    assert image.spacing == pytest.approx((0.661468, 0.661468))


@pytest.mark.parametrize("preset", ["medgemma", "report-v4"])
def test_ct_small_windows_match_exact_arithmetic(ct_small, preset):
    _, hu = stored_and_hu(ct_small)
    rgb = to_rgb(load_image(ct_small), preset)
    assert rgb.shape == hu.shape + (3,) and rgb.dtype == np.uint8
    windows = {"medgemma": [(-1024, 1024), (-135, 215), (0, 80)], "report-v4": [(-1225, 1025), (-135, 215), (0, 80)]}
    for channel, (low, high) in enumerate(windows[preset]):
        expected, ties = exact_window(hu, low, high)
        got = rgb[..., channel]
        np.testing.assert_array_equal(got[~ties], expected[~ties])
        assert np.all(np.abs(got[ties].astype(int) - expected[ties].astype(int)) <= 1)
        assert len(np.unique(got)) > 10, "the test slice must exercise the window, not just clip"


def test_ct_default_is_the_notebook_recipe_bit_for_bit(ct_small):
    _, hu = stored_and_hu(ct_small)
    rgb = to_rgb(load_image(ct_small))
    for channel, (low, high) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        np.testing.assert_array_equal(rgb[..., channel], notebook_window(hu, low, high))


def test_green_window_is_minus_135_not_the_handler_typo(ct_small):
    assert PRESETS["medgemma"][1] == (-135.0, 215.0)
    assert PRESETS["report-v4"][0] == (-1225.0, 1025.0)
    _, hu = stored_and_hu(ct_small)
    rgb = to_rgb(load_image(ct_small))
    water = hu == 0
    assert water.any()
    # 0 HU sits 135/350 into [-135, 215]; with the typo [135, 215] it would be black.
    assert set(rgb[..., 1][water]) == {round(135 / 350 * 255)}


def test_custom_windows_and_validation(ct_small):
    _, hu = stored_and_hu(ct_small)
    image = load_image(ct_small)
    rgb = to_rgb(image, [(-500, 500), (-100, 100), (20, 60)])
    for channel, (low, high) in enumerate([(-500, 500), (-100, 100), (20, 60)]):
        np.testing.assert_array_equal(rgb[..., channel], notebook_window(hu, low, high))
    gray = to_rgb(image, [(-200, 300)])
    np.testing.assert_array_equal(gray[..., 0], notebook_window(hu, -200, 300))
    assert np.array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ImageError, match="low < high"):
        to_rgb(image, [(10, 10)])
    with pytest.raises(ImageError, match="three"):
        to_rgb(image, [(0, 1), (0, 1)])
    with pytest.raises(ImageError, match="unknown preset"):
        to_rgb(image, "lung")


def test_ct_slope_and_per_frame_rescale(write_ct):
    """A non-unit slope and a multi-frame CT: HU = stored * slope + intercept per frame."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 3000, size=(3, 32, 32)).astype(np.int16)
    path = write_ct("multi.dcm", frames, RescaleSlope="0.5", RescaleIntercept="-1000")
    image = load_image(path)
    assert image.frames == 3 and image.pixels.shape == (3, 32, 32)
    rgb = to_rgb(image)
    assert rgb.shape == (3, 32, 32, 3)
    hu = frames.astype(np.float64) * 0.5 - 1000
    for channel, (low, high) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        np.testing.assert_array_equal(rgb[..., channel], notebook_window(hu, low, high))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode_losslessly(ct_small, tmp_path, syntax):
    raw, _ = stored_and_hu(ct_small)
    ds = pydicom.dcmread(ct_small)
    ds.compress(syntax)
    path = tmp_path / "compressed.dcm"
    ds.save_as(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, raw)
    np.testing.assert_array_equal(to_rgb(image), to_rgb(load_image(ct_small)))


def test_bytes_input_gives_the_same_image(ct_small):
    from_path = load_image(ct_small)
    from_bytes = load_image(ct_small.read_bytes())
    np.testing.assert_array_equal(from_bytes.pixels, from_path.pixels)
    assert from_bytes.source == "<bytes>" and from_path.source == str(ct_small)


def test_ct_series_with_per_slice_rescale(write_ct):
    """Slices of one series may carry different intercepts: HU is computed per slice."""
    from openmedgemma.imaging import load_series

    rng = np.random.default_rng(5)
    stored = rng.integers(0, 2200, size=(3, 16, 16)).astype(np.int16)
    intercepts = [-1024, -1000, -1024]
    paths = [
        write_ct(f"s{k}.dcm", stored[k], RescaleIntercept=str(intercepts[k]),
                 ImagePositionPatient=[0, 0, 10.0 - 5 * k], SOPInstanceUID=pydicom.uid.generate_uid())
        for k in range(3)
    ]
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.slice_positions, [0.0, 5.0, 10.0])  # sorted along +z
    order = [2, 1, 0]
    np.testing.assert_array_equal(volume.rescale_intercept, [intercepts[k] for k in order])
    hu = np.stack([stored[k].astype(np.float64) + intercepts[k] for k in order])
    rgb = to_rgb(volume)
    for channel, (low, high) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        np.testing.assert_array_equal(rgb[..., channel], notebook_window(hu, low, high))


def test_raw_data_set_without_preamble_loads(ct_small, tmp_path):
    ds = pydicom.dcmread(ct_small)
    raw = tmp_path / "raw.dcm"
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(raw).pixels, load_image(ct_small).pixels)
