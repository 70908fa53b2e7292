"""NIfTI volumes: radiological axial display, spacing, scaling and modality."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_image, load_series, to_rgb


def radiological(slice2d: np.ndarray, orientation) -> np.ndarray:
    """Re-lay an axis-aligned DICOM slice so that columns run toward the patient's left (+x in
    DICOM LPS) and rows toward posterior (+y): the usual axial display."""
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    c_axis, r_axis = int(np.argmax(np.abs(row_dir))), int(np.argmax(np.abs(col_dir)))
    c_sign, r_sign = np.sign(row_dir[c_axis]), np.sign(col_dir[r_axis])
    assert {c_axis, r_axis} == {0, 1}, "the test handles axial, axis-aligned slices only"
    if c_axis == 0:  # columns already along x
        out, x_sign, y_sign = slice2d, c_sign, r_sign
    else:
        out, x_sign, y_sign = slice2d.T, r_sign, c_sign
    if y_sign < 0:
        out = out[::-1]
    if x_sign < 0:
        out = out[:, ::-1]
    return out


def test_bids_nifti_matches_the_dicom_series_in_radiological_display(dicom_dir, pacsman_series):
    nifti = load_image(dicom_dir / "pacsman_synthetic" / "bids" / "sub-000001_T1w.nii.gz")
    series = load_series(pacsman_series)
    orientation = pydicom.dcmread(series.source_files[0], stop_before_pixels=True).ImageOrientationPatient
    expected = np.stack([radiological(s, orientation) for s in series.pixels])
    assert nifti.pixels.shape == expected.shape == (128, 128, 128)
    np.testing.assert_array_equal(nifti.pixels, expected)
    assert nifti.modality == "MR"  # from the BIDS sidecar JSON
    assert nifti.spacing == (1.0, 1.0, 1.0)


def test_marker_lands_where_the_affine_says(tmp_path):
    """Voxel grid stored in LPS order (x and y flipped), anisotropic voxels."""
    data = np.zeros((6, 5, 4), dtype=np.int16)
    data[0, 0, 3] = 7  # most superior slice, first row and column
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])  # +i -> patient left (RAS x decreases), +j -> posterior
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii.gz")
    image = load_image(tmp_path / "lps.nii.gz")
    assert image.pixels.shape == (4, 5, 6)  # slices (k), rows (j), columns (i)
    # +i already runs toward the left and +j toward posterior: display[k, j, i] = data[i, j, k]
    np.testing.assert_array_equal(image.pixels, np.transpose(data, (2, 1, 0)))
    assert image.pixels[3, 0, 0] == 7
    assert image.spacing == (4.0, 3.0, 2.0)


def test_ras_nifti_is_flipped_into_display(tmp_path):
    data = np.arange(3 * 4 * 2, dtype=np.int16).reshape(3, 4, 2)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ras.nii")
    image = load_image(tmp_path / "ras.nii")
    # RAS: +i toward the right, +j anterior -> both reversed for display
    np.testing.assert_array_equal(image.pixels, np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def test_ct_nifti_with_scaling_is_windowed_in_hu(tmp_path):
    stored = np.linspace(0, 2500, 4 * 4 * 3).astype(np.int16).reshape(4, 4, 3)
    img = nib.Nifti1Image(stored, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    image = load_image(tmp_path / "ct.nii.gz", modality="ct")
    assert image.modality == "CT" and (image.rescale_slope, image.rescale_intercept) == (1.0, -1024.0)
    hu = np.transpose(stored, (2, 1, 0)).astype(np.float64) - 1024
    rgb = to_rgb(image)
    expected = (np.clip(hu, -135, 215) + 135) / 350 * 255  # exact value before rounding
    assert np.abs(rgb[..., 1].astype(float) - expected).max() <= 0.5 + 1e-4
    assert load_image(tmp_path / "ct.nii.gz").modality == ""  # no sidecar, no modality given


def test_nifti_from_bytes_and_time_series_refused(dicom_dir, tmp_path):
    path = dicom_dir / "pacsman_synthetic" / "nifti" / "pacsman.nii.gz"
    np.testing.assert_array_equal(load_image(path.read_bytes()).pixels, load_image(path).pixels)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(ImageError, match=r"4d.nii: NIfTI of shape \(4, 4, 4, 3\) is not a 3-D volume"):
        load_image(tmp_path / "4d.nii")
