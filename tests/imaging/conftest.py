"""Fixtures for the imaging tests: paths into shared/data and writers of small synthetic files.

Synthetic DICOM files are derived from real headers (CT_small) and written to tmp_path; nothing
large is copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest


@pytest.fixture(scope="session")
def dicom_dir(shared_data) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="session")
def ct_small(dicom_dir) -> Path:
    return dicom_dir / "pydicom_test_files" / "CT_small.dcm"


@pytest.fixture(scope="session")
def mr_small(dicom_dir) -> Path:
    return dicom_dir / "pydicom_test_files" / "MR_small.dcm"


@pytest.fixture(scope="session")
def pacsman_series(dicom_dir) -> Path:
    return dicom_dir / "pacsman_synthetic" / "dicomseries"


@pytest.fixture(scope="session")
def cr_file(dicom_dir) -> Path:
    folder = dicom_dir / "pydicom_test_files" / "dicomdirtests" / "77654033" / "CR1"
    return next(p for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="session")
def cxr_pngs(shared_data) -> list[Path]:
    return sorted((shared_data / "cxr_samples").glob("*.png"))


@pytest.fixture
def write_ct(ct_small, tmp_path):
    """write_ct(name, pixels=None, **attributes) -> path of a CT built from CT_small's header.

    Attributes set to None are deleted; `pixels` (int16 [rows, cols] or [frames, rows, cols])
    replaces the pixel data and updates Rows / Columns / NumberOfFrames."""

    def write(name: str, pixels: np.ndarray | None = None, **attributes) -> Path:
        ds = pydicom.dcmread(ct_small)
        if pixels is not None:
            pixels = np.ascontiguousarray(pixels.astype(np.int16))
            ds.Rows, ds.Columns = pixels.shape[-2:]
            if pixels.ndim == 3:
                ds.NumberOfFrames = pixels.shape[0]
            ds.PixelData = pixels.tobytes()
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return write
