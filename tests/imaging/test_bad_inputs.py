"""Every bad input raises ImageError naming the file and the reason (and nothing else escapes)."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_image, load_series
from openmedgemma.imaging.sniff import DEFAULT_MAX_PIXELS


def expect_error(path, *reasons: str, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path, **kwargs)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    for reason in reasons:
        assert re.search(reason, message), f"{reason!r} not in {message!r}"
    assert "\n" not in message
    return message


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose IHDR declares width x height 8-bit gray, with one tiny IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_png(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 M pixels from a 100-byte file
    expect_error(tmp_path / "bomb.png", "decompression.bomb")
    png_header_only(tmp_path / "large.png", 5000, 5000)  # under Pillow's limit, over ours
    expect_error(tmp_path / "large.png", "25,000,000 pixel samples, above the limit of 1,000,000", max_pixels=10**6)


def test_pillow_limit_applies_below_ours(tmp_path):
    side = 12000  # 144 M pixels: under our default 268 M, over Pillow's MAX_IMAGE_PIXELS (89 M)
    assert side * side < DEFAULT_MAX_PIXELS and side * side > Image.MAX_IMAGE_PIXELS
    png_header_only(tmp_path / "big.png", side, side)
    expect_error(tmp_path / "big.png", "Pillow's decompression-bomb limit")


def test_pixel_limit_is_configurable(ct_small):
    expect_error(ct_small, r"16,384 pixel samples, above the limit of 1,000", max_pixels=1000)
    assert load_image(ct_small, max_pixels=128 * 128).pixels.shape == (128, 128)


def test_decompression_bomb_dicom(write_ct):
    path = write_ct("bomb.dcm", Rows=60000, Columns=60000, NumberOfFrames=100)
    expect_error(path, "360,000,000,000 pixel samples", "decompression bomb")


def test_empty_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    expect_error(tmp_path / "empty.dcm", r"empty file \(0 bytes\)")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.png", "file not found")


def test_unknown_extension_is_sniffed_or_refused(tmp_path, ct_small):
    (tmp_path / "notes.xyz").write_text("hello, not an image")
    expect_error(tmp_path / "notes.xyz", r"unsupported file type \('.xyz'\)", "DICOM, PNG, JPEG, TIFF or NIfTI")
    shutil.copy(ct_small, tmp_path / "scan.bin")  # content decides: DICOM preamble "DICM"
    assert load_image(tmp_path / "scan.bin").modality == "CT"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "really_jpeg.png", format="JPEG")
    assert load_image(tmp_path / "really_jpeg.png").file_format == "jpeg"


def test_content_not_matching_a_known_extension(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"P" * 300)
    expect_error(tmp_path / "fake.dcm", "does not match its extension '.dcm'", "corrupt or mislabelled")


def test_truncated_dicom(ct_small, tmp_path):
    data = ct_small.read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "half.dcm", "corrupt or truncated DICOM|pixel data cannot be decoded")
    (tmp_path / "header_cut.dcm").write_bytes(data[:700])
    expect_error(tmp_path / "header_cut.dcm", "corrupt or truncated DICOM|no pixel data")


def test_corrupt_dicom_length_field(ct_small, tmp_path):
    data = bytearray(ct_small.read_bytes())
    at = data.index(b"\x10\x00\x10\x00PN") + 6  # Patient's Name, explicit VR: 2-byte length
    data[at:at + 2] = b"\xff\xff"
    (tmp_path / "badlength.dcm").write_bytes(bytes(data))
    expect_error(tmp_path / "badlength.dcm", "corrupt or truncated DICOM|pixel data|no pixel data|invalid")


def _non_image(path, sop_class: str, modality: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.save_as(path, enforce_file_format=True)


def test_dicom_without_pixel_data_names_its_sop_class(tmp_path, dicom_dir):
    _non_image(tmp_path / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    expect_error(tmp_path / "report.dcm", "no pixel data", "Basic Text SR Storage", "modality SR")
    _non_image(tmp_path / "contours.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")
    expect_error(tmp_path / "contours.dcm", "no pixel data", "RT Structure Set Storage", "modality RTSTRUCT")
    tiny = dicom_dir / "pydicom_test_files" / "dicomdirtests" / "TINY_ALPHA" / "PT000000" / "ST000000" / "SE000000" / "IM00000J"
    expect_error(tiny, "no pixel data", "CT Image Storage", "modality CT")


def _with_syntax(ct_small, path, syntax: str) -> None:
    ds = pydicom.dcmread(ct_small)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(path)


def test_video_transfer_syntax_is_unsupported(ct_small, tmp_path):
    _with_syntax(ct_small, tmp_path / "video.dcm", pydicom.uid.MPEG2MPML)
    expect_error(tmp_path / "video.dcm", r"unsupported transfer syntax MPEG2 Main Profile / Main Level \(1.2.840.10008.1.2.4.100\)", "video")


def test_unknown_transfer_syntax(ct_small, tmp_path):
    _with_syntax(ct_small, tmp_path / "video.dcm", pydicom.uid.MPEG2MPML)
    data = (tmp_path / "video.dcm").read_bytes()  # pydicom refuses to write an unknown syntax
    (tmp_path / "unknown.dcm").write_bytes(data.replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.999"))
    expect_error(tmp_path / "unknown.dcm", r"unsupported transfer syntax 1.2.840.10008.1.2.4.999", "convert")


def test_missing_decoder_plugin_is_named(ct_small, tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    _with_syntax(ct_small, tmp_path / "jpegls.dcm", pydicom.uid.JPEGLSLossless)
    decoder = get_decoder(pydicom.uid.JPEGLSLossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    expect_error(tmp_path / "jpegls.dcm", r"cannot decode transfer syntax JPEG-LS Lossless", "pyjpegls", "gdcm")


def test_ct_missing_rescale_slope(write_ct):
    path = write_ct("noslope.dcm", RescaleSlope=None)
    expect_error(path, "CT has RescaleIntercept but no RescaleSlope", "Hounsfield")


def test_ct_missing_rescale_intercept(write_ct):
    path = write_ct("nointercept.dcm", RescaleIntercept=None)
    expect_error(path, "CT has RescaleSlope but no RescaleIntercept", "Hounsfield")


def test_ct_missing_both_is_refused(write_ct):
    path = write_ct("norescale.dcm", RescaleSlope=None, RescaleIntercept=None)
    expect_error(path, "CT without RescaleSlope and RescaleIntercept", r"\+1024")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom, while the test writes it
def test_ct_non_finite_slope(write_ct):
    expect_error(write_ct("nan.dcm", RescaleSlope="nan"), "RescaleSlope is nan, not a finite number")


def test_series_mixing_two_series_uids(pacsman_series, tmp_path):
    for k in range(3):
        shutil.copy(pacsman_series / f"slice{k}.dcm", tmp_path / f"a{k}.dcm")
    ds = pydicom.dcmread(pacsman_series / "slice5.dcm")
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(tmp_path / "b.dcm")
    with pytest.raises(ImageError) as caught:
        load_series(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path)) and "2 series mixed" in message and "1.2.3.4.5: 1 file(s)" in message


def test_corrupt_png_tiff_and_nifti(tmp_path, cxr_pngs, dicom_dir):
    data = cxr_pngs[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    expect_error(tmp_path / "cut.png", "corrupt or truncated PNG")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + b"\x08\x00\x00\x00" + b"\xff" * 20)
    expect_error(tmp_path / "cut.tif", "corrupt or truncated TIFF")
    nifti = gzip.decompress((dicom_dir / "pacsman_synthetic" / "nifti" / "pacsman.nii.gz").read_bytes())
    (tmp_path / "cut.nii").write_bytes(nifti[:2000])
    expect_error(tmp_path / "cut.nii", "corrupt or truncated NIfTI")


def test_folder_given_to_load_image(tmp_path):
    expect_error(tmp_path, "is a folder", "load_series")
