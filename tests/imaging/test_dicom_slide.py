"""DICOM whole-slide images: a pyramidal TIFF written here, converted by wsidicomizer (lossless JPEG tiles), tiled
from the local DICOM folder and from a real Orthanc (started once for this module) with the same patches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest

from openmedgemma.errors import ImageError, PacsError
from openmedgemma.imaging import tile_slide
from openmedgemma.imaging.dicomweb import DicomWebSource
from openmedgemma.imaging.pacs import load_study
from tests.imaging.test_slide import BACKGROUND, TISSUE, write_slide
from tests.orthanc import PASSWORD, USER, Orthanc, require_orthanc


CONVERT = """
import sys
from wsidicom.codec import JpegLosslessSettings
from wsidicomizer import WsiDicomizer
from wsidicomizer.sources import TiffSlideSource

WsiDicomizer.convert(sys.argv[1], sys.argv[2], preferred_source=TiffSlideSource, tile_size=256,
                     encoding=JpegLosslessSettings(), include_label=False, include_overview=False,
                     include_thumbnail=False)
"""


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """(TIFF path, DICOM WSI folder, base RGB array): 20x, 2048 x 1536, tissue in x [512, 1536), y [256, 1280)."""
    folder = tmp_path_factory.mktemp("wsi")
    base = np.empty((1536, 2048, 3), dtype=np.uint8)
    base[:] = BACKGROUND
    base[256:1280, 512:1536] = TISSUE
    base[256:1280, 512:1536] += np.random.default_rng(0).integers(0, 20, (1024, 1024, 3), dtype=np.uint8)
    tiff = folder / "slide.tif"
    write_slide(tiff, base)
    # in a child process: importing wsidicomizer turns on pydicom's v4 "future" behaviour process-wide,
    # under which pydicom 3's pixel_array no longer works for the rest of the test session
    subprocess.run([sys.executable, "-c", CONVERT, str(tiff), str(folder / "dicom")], check=True, timeout=300)
    return tiff, folder / "dicom", base


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, slides, ct_small):
    require_orthanc()
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(sorted(slides[1].glob("*.dcm")) + [ct_small])
        yield server


@pytest.fixture
def store(pacs) -> DicomWebSource:
    return DicomWebSource(pacs.dicomweb_url, username=USER, password=PASSWORD, timeout=10)


def _uids(folder):
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


def _same(a, b) -> None:
    assert a.coordinates == b.coordinates and a.grid_shape == b.grid_shape and a.tissue_patches == b.tissue_patches
    assert a.base_magnification == b.base_magnification == 20 and len(a.patches) == len(b.patches) > 0
    for x, y in zip(a.patches, b.patches):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("magnification", "patch"), [(20, 256), (10, 128), (5, 128)])
def test_dicom_folder_gives_the_tiffs_patches(slides, magnification, patch):
    tiff, folder, _ = slides
    _same(tile_slide(folder, magnification, patch=patch), tile_slide(tiff, magnification, patch=patch))


def test_orthanc_gives_the_local_folders_patches_fetching_only_needed_tiles(slides, store):
    _, folder, base = slides
    study, series = _uids(folder)
    local = tile_slide(folder, 20, patch=256)
    slide = store.open_slide(study, series)
    try:
        remote = tile_slide(slide, 20, patch=256)
    finally:
        slide.close()
    _same(remote, local)
    assert remote.source == f"{store.url}/studies/{study}/series/{series}"
    np.testing.assert_array_equal(remote.patches[0], base[256:512, 512:768])  # lossless: the TIFF's own pixels
    stored = sum(p.stat().st_size for p in folder.glob("*.dcm"))
    assert store.bytes_received < stored  # 16 of 48 level-0 tiles (the textured ones), the 5x level for the mask
    fresh = DicomWebSource(store.client.base_url, username=USER, password=PASSWORD)
    slide = fresh.open_slide(study, series)
    try:
        two = tile_slide(slide, 20, patch=256, max_patches=2)
    finally:
        slide.close()
    _same(two, tile_slide(folder, 20, patch=256, max_patches=2))
    assert fresh.bytes_received < 0.3 * stored  # 2 level-0 tiles: the tiles a patch needs, not the slide


def test_study_content_of_a_slide(slides, store):
    _, folder, _ = slides
    study, series = _uids(folder)
    loaded = load_study(store, study, magnification=10, patch=128, max_patches=3)
    assert loaded.kind == "slide" and len(loaded.patches.patches) == 3 and loaded.patches.tissue_patches == 16
    content = store.study_content(study, "Tumour?", magnification=10, patch=128, max_patches=3)
    assert [item["type"] for item in content] == ["text", "image", "image", "image", "text"]
    assert content[0]["text"] == "You are given 3 patches of one whole-slide image at 10x, in spatial order."
    expected = tile_slide(folder, 10, max_patches=3, patch=128)
    for item, patch in zip(content[1:4], expected.patches):
        np.testing.assert_array_equal(item["image"], patch)


def test_slide_errors_name_the_url_path(slides, store, ct_small, tmp_path):
    _, folder, _ = slides
    study, series = _uids(folder)
    with pytest.raises(ImageError, match=rf"studies/{study}/series/{series}: 40x asked, the slide is scanned at 20x"):
        load_study(store, study, magnification=40)
    ct = pydicom.dcmread(ct_small, stop_before_pixels=True)
    with pytest.raises(ImageError, match=rf"series/{ct.SeriesInstanceUID}: not a readable DICOM whole-slide image"):
        store.open_slide(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    with pytest.raises(PacsError, match=rf"studies/{study}/series/1.2.3: no such series on the server"):
        store.open_slide(study, "1.2.3")
    (tmp_path / "not_wsi").mkdir()
    (tmp_path / "not_wsi" / "ct.dcm").write_bytes(ct_small.read_bytes())
    with pytest.raises(ImageError, match="not_wsi: not a readable DICOM whole-slide image folder"):
        tile_slide(tmp_path / "not_wsi", 10)
