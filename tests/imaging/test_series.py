"""Series loading (order along the slice normal), slice sampling, MR normalisation, messages."""

from __future__ import annotations

import re
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from openmedgemma.errors import ImageError
from openmedgemma.imaging import (
    MedicalImage, load_image, load_series, sample_indices, sample_slices, to_rgb, volume_messages,
)


@pytest.fixture(scope="module")
def pacsman(pacsman_series):
    return load_series(pacsman_series)


def test_pacsman_file_names_are_not_in_z_order(pacsman_series):
    """Guard for the next test: listing order of the files is not slice order."""
    names = sorted(p.name for p in pacsman_series.glob("*.dcm"))
    z = [float(pydicom.dcmread(pacsman_series / n, stop_before_pixels=True).ImagePositionPatient[2]) for n in names]
    assert z != sorted(z)


def test_pacsman_series_matches_the_nifti_volume(pacsman, dicom_dir):
    nifti = np.asarray(nib.load(dicom_dir / "pacsman_synthetic" / "nifti" / "pacsman.nii.gz").dataobj)
    # nifti[:, :, k] is slice k (identity affine, same voxel grid as the DICOM pixel arrays).
    expected = np.transpose(nifti, (2, 0, 1))
    assert pacsman.pixels.shape == (128, 128, 128)
    np.testing.assert_array_equal(pacsman.pixels, expected)
    assert pacsman.modality == "MR" and pacsman.warnings == ()


def test_pacsman_positions_ascend_along_the_normal(pacsman):
    files = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacsman.source_files]
    orientation = np.array(files[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)) for ds in files]
    assert along == sorted(along) and len(set(along)) == 128
    np.testing.assert_allclose(pacsman.slice_positions, along)
    assert pacsman.spacing == (1.0, 1.0, 1.0)
    numbers = [int(re.search(r"slice(\d+)", f).group(1)) for f in pacsman.source_files]
    assert numbers == list(range(128))


def test_sample_indices_follow_the_notebook():
    n = 128
    reference = []
    for i in range(1, 86):  # i = 1 .. 85 inclusive: slice 0 is never drawn, the last always is
        reference.append(int(round(i / 85 * (n - 1))))
    assert sample_indices(n) == reference
    assert reference[0] == 1 and reference[-1] == 127 and len(set(reference)) == 85
    assert sample_indices(85) == list(range(85)) and sample_indices(10) == list(range(10))
    assert sample_indices(86) == list(range(1, 86))
    with pytest.raises(ImageError):
        sample_indices(10, 0)


def test_sample_slices_keeps_geometry_and_files(pacsman):
    sampled = sample_slices(pacsman)
    keep = sample_indices(128)
    assert sampled.pixels.shape == (85, 128, 128)
    np.testing.assert_array_equal(sampled.pixels, pacsman.pixels[keep])
    assert sampled.slice_indices == tuple(keep)
    assert sampled.source_files == tuple(pacsman.source_files[i] for i in keep)
    np.testing.assert_array_equal(sampled.slice_positions, pacsman.slice_positions[keep])


def test_mr_volume_is_normalised_over_the_whole_volume():
    """The maximum sits in slice 0, which sampling drops; it must still set the scale."""
    volume = np.zeros((100, 4, 4), dtype=np.int16)
    volume[0] = 1000
    volume[1:] = np.arange(16).reshape(4, 4) * 10
    image = MedicalImage(pixels=volume, modality="MR", photometric="MONOCHROME2", source="synthetic", file_format="dicom")
    sampled = sample_slices(image)
    assert 0 not in sampled.slice_indices
    rgb = to_rgb(sampled)
    expected = np.round(volume[list(sampled.slice_indices)].astype(np.float64) / 1000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    local = to_rgb(sampled.replace(intensity_range=None))
    assert local[..., 0].max() == 255 and not np.array_equal(local, rgb)


def test_mr_single_image_min_max(mr_small):
    ds = pydicom.dcmread(mr_small)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns).astype(np.float64)
    expected = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255).astype(np.uint8)
    rgb = to_rgb(load_image(mr_small))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_pacsman_mr_rgb(pacsman):
    rgb = to_rgb(sample_slices(pacsman))
    # values 0, 1, 2 over the whole volume -> 0, 127.5 (half to even: 128), 255
    assert set(np.unique(rgb)) == {0, 128, 255}


def test_volume_messages_interleave_slices(pacsman):
    content = volume_messages(pacsman, "You are a radiologist.", "Describe the findings.")
    assert len(content) == 1 + 2 * 85 + 1
    assert content[0] == {"type": "text", "text": "You are a radiologist."}
    assert content[-1] == {"type": "text", "text": "Describe the findings."}
    expected_rgb = to_rgb(sample_slices(pacsman))
    for n in range(1, 86):
        image, label = content[2 * n - 1], content[2 * n]
        assert image["type"] == "image" and label == {"type": "text", "text": f"SLICE {n}"}
        assert image["image"].dtype == np.uint8 and image["image"].shape == (128, 128, 3)
        np.testing.assert_array_equal(image["image"], expected_rgb[n - 1])


def test_mixed_series_is_an_error_unless_one_is_picked(dicom_dir):
    folder = dicom_dir / "pydicom_test_files" / "dicomdirtests" / "98892003" / "MR2"
    with pytest.raises(ImageError) as err:
        load_series(folder)
    message = str(err.value)
    assert str(folder) in message and "3 series mixed" in message and "series_uid" in message
    localizer = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.481"
    picked = load_series(folder, series_uid=localizer)
    assert picked.frames == 1 and picked.series_uid == localizer
    # a three-plane pilot (transverse / sagittal / coronal) is not a volume
    with pytest.raises(ImageError, match=f"{folder}/\\d+: ImageOrientationPatient differs"):
        load_series(folder, series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.17")
    with pytest.raises(ImageError, match="no series with SeriesInstanceUID 1.2.3"):
        load_series(folder, series_uid="1.2.3")


def test_gap_is_reported(dicom_dir):
    folder = dicom_dir / "pydicom_test_files" / "dicomdirtests" / "77654033" / "CT2"
    volume = load_series(folder)
    assert volume.frames == 4
    assert any("gap of 202.500 mm" in w for w in volume.warnings)


def test_duplicates_and_gaps_in_a_copied_series(pacsman_series, tmp_path):
    for k in list(range(10, 20)) + [30, 31, 32]:
        shutil.copy(pacsman_series / f"slice{k}.dcm", tmp_path / f"slice{k}.dcm")
    ds = pydicom.dcmread(pacsman_series / "slice15.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "again15.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    volume = load_series(tmp_path)
    assert volume.frames == 14
    assert any("duplicate slice position 15.000" in w for w in volume.warnings)
    assert any("gap of 11.000 mm" in w for w in volume.warnings)
    assert any("skipped 1 file" in w for w in volume.warnings)
    np.testing.assert_array_equal(volume.slice_positions, sorted(list(range(10, 20)) + [15, 30, 31, 32]))


def test_series_from_a_list_of_files_in_any_order(pacsman_series):
    files = sorted(pacsman_series.glob("slice1*.dcm"), reverse=True)  # slice1, 10-19, 100-127
    volume = load_series(files)
    numbers = sorted(int(re.search(r"slice(\d+)", str(f)).group(1)) for f in files)
    np.testing.assert_array_equal(volume.slice_positions, numbers)
    with pytest.raises(ImageError, match="not a DICOM file"):
        load_series(files + [pacsman_series.parent / "png" / "pacsman.png"])
