"""imaging.inputs: volumes (series folder, zip, NIfTI, multi-frame DICOM, bytes) and slide cases -> the
MedGemma 1.5 content layout; message expansion; contact sheets with labels; one clear error per bad input."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pydicom
import pytest

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_series, sample_indices, sample_slices, to_rgb
from openmedgemma.imaging.inputs import (
    contact_sheet, expand_content, slides_content, slides_input, volume_content, volume_input,
)
from openmedgemma.imaging.slide import allocate
from tests.imaging.test_slide import BACKGROUND, TISSUE, write_slide


@pytest.fixture(scope="module")
def pacsman_volume(pacsman_series):
    return load_series(pacsman_series)


@pytest.fixture(scope="module")
def pacsman_zip(pacsman_series, tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "series.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(pacsman_series.iterdir()):
            archive.write(file, f"study/{file.name}")
    return path


def assert_layout(content, slices):
    """[image, "SLICE 1", image, "SLICE 2", ...] with exactly these RGB slices."""
    assert len(content) == 2 * len(slices)
    for n, rgb in enumerate(slices, start=1):
        image, label = content[2 * n - 2], content[2 * n - 1]
        assert image["type"] == "image" and label["type"] == "text" and label["text"] == f"SLICE {n}"
        np.testing.assert_array_equal(image["image"], rgb)


def test_series_folder_full_size_layout_in_patient_axis_order(pacsman_series, pacsman_volume):
    made = volume_input(pacsman_series)
    expected = to_rgb(sample_slices(pacsman_volume))
    assert_layout(made.content, expected)
    assert made.summary == {"kind": "volume", "source": str(pacsman_series), "modality": "MR", "preset": None,
                            "slices": 85, "total_slices": 128, "slice_indices": sample_indices(128)}  # fmt: skip
    # slice order follows ImagePositionPatient along the normal, not the file names (which are not in z order)
    files = pacsman_volume.source_files
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    picked = [z[i] for i in made.summary["slice_indices"]]
    assert picked == sorted(picked) and len(set(picked)) == 85
    assert made.captions == [f"SLICE {n}" for n in range(1, 86)]
    assert {item["group"]["unit"] for item in made.content} == {"slices"}


def test_nifti_is_the_same_volume_in_the_same_slice_order(pacsman_series, dicom_dir):
    folder = volume_input(pacsman_series, max_slices=9).images
    nifti = volume_input(dicom_dir / "pacsman_synthetic" / "nifti" / "pacsman.nii.gz", max_slices=9)
    assert nifti.summary["slices"] == 9 and nifti.summary["total_slices"] == 128
    assert nifti.summary["slice_indices"] == sample_indices(128, 9)
    for a, b in zip(folder, nifti.images):  # NIfTI is laid out for display: rows and columns swapped and flipped
        np.testing.assert_array_equal(a.transpose(1, 0, 2)[::-1, ::-1], b)


def test_zip_path_and_bytes_equal_the_folder(pacsman_series, pacsman_zip):
    folder = volume_content(pacsman_series, max_slices=6)
    from_path = volume_input(pacsman_zip, max_slices=6)
    from_bytes = volume_input(pacsman_zip.read_bytes(), max_slices=6, label="upload")
    for made in (from_path, from_bytes):
        assert_layout(made.content, [item["image"] for item in folder[::2]])
    assert from_bytes.summary["source"] == "upload"


def test_zip_caps_apply_to_bytes(pacsman_zip):
    with pytest.raises(ImageError, match="upload"):
        volume_content(pacsman_zip.read_bytes(), label="upload", max_members=10)


def test_multi_frame_ct_with_presets_from_file_and_bytes(write_ct):
    hu = np.linspace(-1000, 1000, 12 * 8 * 8).reshape(12, 8, 8)
    path = write_ct("multi.dcm", (hu + 1024).astype(np.int16), RescaleIntercept=-1024, RescaleSlope=1)
    made = volume_input(path, max_slices=5)
    assert made.summary["preset"] == "medgemma" and made.summary["modality"] == "CT"
    assert made.summary["slice_indices"] == sample_indices(12, 5)
    v4 = volume_input(path.read_bytes(), max_slices=5, preset="report-v4")
    assert v4.summary["preset"] == "report-v4" and v4.summary["source"] == "<bytes>"
    assert not all(np.array_equal(a, b) for a, b in zip(made.images, v4.images))
    assert len(made.content) == 10


def test_a_single_image_is_one_unlabelled_item(ct_small):
    made = volume_input(ct_small)
    assert made.summary["kind"] == "image" and made.summary["slices"] == 1
    assert [item["type"] for item in made.content] == ["image"] and made.captions == [""]


def test_named_preset_is_ignored_for_mr_but_reported(pacsman_series):
    made = volume_input(pacsman_series, preset="medgemma", max_slices=2)
    assert made.summary["preset"] is None


def test_two_series_in_a_folder_named_and_none_taken(pacsman_series, dicom_dir, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(pacsman_series, folder / "a")
    shutil.copy(dicom_dir / "pydicom_test_files" / "CT_small.dcm", folder / "ct.dcm")
    with pytest.raises(ImageError, match=r"files from 2 series mixed .*pass series_uid"):
        volume_content(folder)
    uid = pydicom.dcmread(next(pacsman_series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert len(volume_content(folder, series_uid=uid, max_slices=3)) == 6


def test_bad_volume_sources(tmp_path):
    with pytest.raises(ImageError, match="nowhere: no such file or folder"):
        volume_content(tmp_path / "nowhere")
    with pytest.raises(ImageError, match="max_slices"):
        volume_content(tmp_path, max_slices=0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="no DICOM files"):
        volume_content(tmp_path)
    with pytest.raises(ImageError, match="a volume is"):
        volume_content(3.5)


# ---------------------------------------------------------------------- slides


def tissue_slide(path, tissue: tuple[int, int, int, int], size=(1024, 1024), levels=(1, 4)):
    """A 20x pyramidal TIFF with one tissue rectangle (x0, y0, x1, y1) at level 0."""
    base = np.empty((size[1], size[0], 3), dtype=np.uint8)
    base[:] = BACKGROUND
    x0, y0, x1, y1 = tissue
    base[y0:y1, x0:x1] = TISSUE
    write_slide(path, base, levels=levels)
    return path


@pytest.fixture
def case(tmp_path):
    big = tissue_slide(tmp_path / "resection.tif", (0, 0, 1024, 768))  # 8 x 6 = 48 patches of 128
    small = tissue_slide(tmp_path / "biopsy.tif", (256, 256, 512, 512))  # 2 x 2 = 4 patches
    return big, small


def test_allocate_is_proportional_with_one_each_at_least():
    assert allocate([48, 4], 60) == [48, 4]
    assert allocate([48, 4], 13) == [12, 1]
    assert allocate([100, 1, 1], 10) == [8, 1, 1]
    assert sum(allocate([7, 5, 3], 6)) == 6 and min(allocate([7, 5, 3], 6)) >= 1
    assert allocate([5, 5], 5) == [3, 2]  # ties: the earlier slide


def test_two_slide_case_layout_and_stratified_cap(case):
    big, small = case
    full = slides_input([big, small], magnification=20, patch_size=128)
    assert full.summary["patches"] == 52 and [s["patches"] for s in full.summary["slides"]] == [48, 4]
    content = full.content
    assert content[0] == {"type": "text", "text": "SLIDE 1", "group": content[0]["group"]}
    assert content[49]["text"] == "SLIDE 2" and [i["type"] for i in content[50:]] == ["image"] * 4
    capped = slides_input([big, small], magnification=20, patch_size=128, max_patches=13, seed=5)
    assert [s["patches"] for s in capped.summary["slides"]] == [12, 1]
    assert [s["tissue_patches"] for s in capped.summary["slides"]] == [48, 4]
    assert capped.captions[:2] == ["SLIDE 1 PATCH 1", "SLIDE 1 PATCH 2"] and capped.captions[-1] == "SLIDE 2 PATCH 1"
    coords = [s["coordinates"] for s in capped.summary["slides"]]
    assert coords[0] == sorted(coords[0], key=lambda xy: (xy[1], xy[0]))  # spatial (row-major) order kept
    again = slides_input([big, small], magnification=20, patch_size=128, max_patches=13, seed=5)
    assert [s["coordinates"] for s in again.summary["slides"]] == coords
    other = slides_input([big, small], magnification=20, patch_size=128, max_patches=13, seed=6)
    assert [s["coordinates"] for s in other.summary["slides"]][0] != coords[0]


def test_one_slide_has_no_label(case):
    content = slides_content(case[1], magnification=20, patch_size=128)
    assert [item["type"] for item in content] == ["image"] * 4


def test_slide_without_tissue(tmp_path, case):
    blank = tissue_slide(tmp_path / "glass.tif", (0, 0, 0, 0))
    with pytest.raises(ImageError, match=r"glass.tif: no tissue found: none of the 64 patches"):
        slides_content([case[0], blank], magnification=20, patch_size=128)


def test_missing_pyramid_level(tmp_path):
    flat = tissue_slide(tmp_path / "flat.tif", (0, 0, 1024, 1024), levels=(1,))  # level 0 only
    with pytest.raises(ImageError, match=r"flat.tif: no pyramid level for 2.5x patches .* the nearest is 20x"):
        slides_content(flat, magnification=2.5, patch_size=64)


def test_slide_case_errors(case, tmp_path):
    with pytest.raises(ImageError, match="fewer than the 2 slides"):
        slides_content(list(case), magnification=20, patch_size=128, max_patches=1)
    with pytest.raises(ImageError, match="at least one slide"):
        slides_content([], magnification=20)
    with pytest.raises(ImageError, match="scanned at 20x"):
        slides_content(list(case), magnification=40)


# ---------------------------------------------------------------------- messages and sheets


def test_expand_content_volume_slides_and_folder_images(pacsman_series, case):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Look."},
        {"type": "volume", "volume": str(pacsman_series), "max_slices": 3},
        {"type": "slides", "slides": [str(p) for p in case], "magnification": 20, "patch_size": 128, "max_patches": 5},
        {"type": "image", "image": str(pacsman_series)},
        {"type": "text", "text": "Question?"},
    ]}]  # fmt: skip
    expanded, summaries = expand_content(messages)
    assert [s["kind"] for s in summaries] == ["volume", "slides", "volume"]
    assert [s.get("slices", s.get("patches")) for s in summaries] == [3, 5, 85]
    items = expanded[0]["content"]
    assert len(items) == 1 + 6 + (2 + 5) + 170 + 1 and items[-1]["text"] == "Question?"
    assert messages[0]["content"][1]["type"] == "volume"  # the input is not modified
    plain = [{"role": "user", "content": "hi"}]
    assert expand_content(plain) == (plain, [])
    with pytest.raises(ImageError, match="unknown: slices"):
        expand_content([{"role": "user", "content": [{"type": "volume", "volume": "x", "slices": 3}]}])


def test_contact_sheet_labels(pacsman_series):
    made = volume_input(pacsman_series, max_slices=5)
    bare = contact_sheet(made.images, [""] * 5)
    labelled = contact_sheet(made.images, made.captions)
    assert bare.shape == labelled.shape == (2 * 128, 3 * 128, 3)
    np.testing.assert_array_equal(bare[:128, :128], made.images[0])
    assert not np.array_equal(labelled[:20, :60], bare[:20, :60])  # the label sits in the top-left corner
    np.testing.assert_array_equal(labelled[64:128], bare[64:128])  # and nowhere else
    small = contact_sheet(made.images, made.captions, tile=32)
    assert small.shape == (64, 96, 3)


def test_zip_in_memory_never_touches_disk(pacsman_zip, tmp_path, monkeypatch):
    """Bytes are read in memory: nothing is written (the working folder stays empty)."""
    monkeypatch.chdir(tmp_path)
    data = io.BytesIO(pacsman_zip.read_bytes()).getvalue()
    assert len(volume_content(data, max_slices=2)) == 4
    assert list(tmp_path.iterdir()) == []


def test_mixed_modalities_in_one_series(write_ct, tmp_path):
    write_ct("a.dcm", InstanceNumber=1, ImagePositionPatient=[0, 0, 0])
    write_ct("b.dcm", InstanceNumber=2, ImagePositionPatient=[0, 0, 1], Modality="MR")
    with pytest.raises(ImageError, match=r"b.dcm: modality 'MR' differs from the series' 'CT'"):
        volume_content(tmp_path)
