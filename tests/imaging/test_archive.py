"""Zipped DICOM series: read in memory with caps, same volume as the folder, clear errors."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from openmedgemma.errors import ImageError
from openmedgemma.imaging.archive import read_zip
from openmedgemma.imaging.series import load_series


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def series_zip(pacsman_series) -> bytes:
    members = {f"PACS/export/{p.name}": p.read_bytes() for p in sorted(pacsman_series.iterdir()) if p.is_file()}
    members["__MACOSX/._slice0.dcm"] = b"resource fork"
    members["PACS/README.txt"] = b"not DICOM"
    return _zip(members)


def test_zip_bytes_and_zip_file_give_the_folder_volume(pacsman_series, series_zip, tmp_path):
    folder = load_series(pacsman_series)
    in_memory = load_series(series_zip, label="upload.zip")
    assert in_memory.pixels.shape == folder.pixels.shape == (128, 128, 128)
    assert np.array_equal(in_memory.pixels, folder.pixels)  # same z order though members are not in z order
    np.testing.assert_array_equal(in_memory.slice_positions, folder.slice_positions)
    assert in_memory.warnings == ("skipped 1 file(s) that are not DICOM images",)  # README.txt; __MACOSX unread
    path = tmp_path / "series.zip"
    path.write_bytes(series_zip)
    assert np.array_equal(load_series(path).pixels, folder.pixels)


def test_nothing_is_written_to_disk(series_zip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = _zip({"../../escape.dcm": zipfile.ZipFile(io.BytesIO(series_zip)).read("PACS/export/slice0.dcm")})
    volume = load_series(hostile, label="hostile.zip")
    assert volume.pixels.shape[0] == 1
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "escape.dcm").exists()


def test_caps_on_member_count_and_bytes(series_zip):
    with pytest.raises(ImageError, match=r"upload.zip: 129 files in the archive, more than the limit of 100"):
        read_zip(series_zip, label="upload.zip", max_members=100)
    with pytest.raises(ImageError, match=r"upload.zip: \d+ uncompressed bytes, more than the limit of 4096"):
        read_zip(series_zip, label="upload.zip", max_bytes=4096)
    bomb = _zip({"zeros.dcm": bytes(50_000_000)})  # 50 MB of zeros compress to ~50 kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="more than the limit of 1000000"):
        read_zip(bomb, label="bomb.zip", max_bytes=1_000_000)


def test_lying_sizes_cannot_get_past_the_cap():
    data = bytearray(_zip({"a.dcm": bytes(10_000)}))
    # declare 10 bytes in the central directory (offset 24: uncompressed size), keep the real stream:
    # zipfile reads 10 bytes, not 10 000, and the CRC then fails
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    with pytest.raises(ImageError, match=r"lie.zip: member 'a.dcm' cannot be read \(Bad CRC-32"):
        read_zip(bytes(data), label="lie.zip", max_bytes=1000)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"PK\x03\x04 not really a zip", "bad.zip: not a readable zip archive"),
        (_zip({"notes.txt": b"hello"}), "bad.zip: no DICOM files found"),
        (_zip({}), "bad.zip: not a readable zip archive|bad.zip: the zip archive holds no files"),
    ],
)
def test_bad_archives_are_named(data, message):
    with pytest.raises(ImageError, match=message):
        load_series(data, label="bad.zip")


def test_corrupt_member_is_named(series_zip):
    archive = zipfile.ZipFile(io.BytesIO(series_zip))
    members = {n: archive.read(n) for n in ["PACS/export/slice0.dcm", "PACS/export/slice1.dcm"]}
    members["PACS/export/slice1.dcm"] = members["PACS/export/slice1.dcm"][:-5000]  # pixel data cut short
    with pytest.raises(ImageError, match=r"PACS/export/slice1.dcm: pixel data cannot be decoded"):
        load_series(_zip(members), label="cut.zip")


def test_in_memory_members(pacsman_series):
    files = sorted(p for p in pacsman_series.iterdir() if p.is_file())[:5]
    volume = load_series([(p.name, p.read_bytes()) for p in files])
    assert volume.pixels.shape[0] == 5 and all(not f.startswith("/") for f in volume.source_files)
    with pytest.raises(ImageError, match="notes.txt: unsupported file type"):
        load_series([(files[0].name, files[0].read_bytes()), ("notes.txt", b"hello")])
