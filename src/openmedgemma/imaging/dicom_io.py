"""DICOM file -> MedicalImage, with every failure turned into an ImageError naming the file.

Compressed transfer syntaxes are decoded by pydicom's pixel-data plugins (pylibjpeg and its
libjpeg / openjpeg / rle plugins, or Pillow). A CT must carry both Rescale Slope and Rescale
Intercept: they are Type 1 in the CT Image module and the only way to get Hounsfield units.
A CT with neither is refused rather than guessed: stored values are sometimes HU already and
sometimes offset by +1024 (unsigned storage), and a silent 1024 HU shift would move air into the
soft-tissue window without any visible error.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_header import require_ct_rescale, rescale_of, spacing_of, voi_lut_of, window_of
from openmedgemma.imaging.image import COLOUR_PHOTOMETRICS, MedicalImage
from openmedgemma.imaging.sniff import check_pixel_count, describe, printable

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_VIDEO_HINT = "it is a video transfer syntax: no pydicom pixel-data plugin decodes it; extract frames with a video tool first"
_CONVERT_HINT = (
    "no installed pydicom pixel-data plugin decodes it; convert the file to an uncompressed, "
    "JPEG, JPEG-LS, JPEG 2000 or RLE transfer syntax first (e.g. dcmtk dcmconv / gdcmconv)"
)


def short_reason(err: BaseException) -> str:
    """One line, at most 200 characters, for an exception raised by a third-party reader."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


def read_dataset(source: str | Path | bytes):
    """pydicom Dataset of a file or bytes; ImageError if it cannot be parsed."""
    import pydicom

    name = describe(source)
    handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(handle, force=True)
    except Exception as err:  # pydicom raises many types on malformed input
        raise ImageError(f"{name}: corrupt or truncated DICOM ({short_reason(err)})") from None


def load_dicom(source: str | Path | bytes, *, max_pixels: int | None = None) -> MedicalImage:
    """Read one DICOM file (single- or multi-frame) into a MedicalImage."""
    name = describe(source)
    ds = read_dataset(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataset_to_image(ds, name, max_pixels=max_pixels)
    except ImageError:
        raise
    except Exception as err:  # malformed values surface lazily, when elements are accessed
        raise ImageError(f"{name}: corrupt or truncated DICOM ({short_reason(err)})") from None


def dataset_to_image(ds, name: str, *, max_pixels: int | None = None) -> MedicalImage:
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ImageError(f"{name}: DICOM has no pixel data ({describe_sop(ds)}); it is not an image")
    ensure_transfer_syntax(ds, name)
    rows, columns = _positive_int(ds, "Rows", name), _positive_int(ds, "Columns", name)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if frames < 1 or samples not in (1, 3):
        raise ImageError(f"{name}: invalid NumberOfFrames {frames} or SamplesPerPixel {samples}")
    check_pixel_count(name, rows * columns * frames * samples, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    single_sample = photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    if (samples == 1) != single_sample or (samples == 3 and photometric not in COLOUR_PHOTOMETRICS):
        raise ImageError(f"{name}: PhotometricInterpretation {photometric!r} does not fit SamplesPerPixel {samples}")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    slope, intercept = rescale_of(ds, name, frames)
    if modality == "CT" and photometric not in COLOUR_PHOTOMETRICS:
        require_ct_rescale(name, slope, intercept)
    pixels = decode_pixels(ds, name, photometric)
    colour = samples == 3 or photometric == "PALETTE COLOR"
    expected = ((frames,) if frames > 1 else ()) + (rows, columns) + ((3,) if colour else ())
    if pixels.shape != expected:
        raise ImageError(f"{name}: decoded pixel array has shape {pixels.shape}, header says {expected}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageError(f"{name}: pixel data contains NaN or infinite values")
    center, width, function = window_of(ds, name)
    return MedicalImage(
        pixels=pixels,
        modality=modality,
        photometric=photometric,
        source=name,
        file_format="dicom",
        spacing=spacing_of(ds, name),
        rescale_slope=slope,
        rescale_intercept=intercept,
        window_center=center,
        window_width=width,
        voi_lut_function=function,
        voi_lut=voi_lut_of(ds, name),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
    )


DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (DICOMDIR)


def sop_class_uid(ds):
    """SOP Class UID of the data set, else the file meta's Media Storage SOP Class UID."""
    return ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")


def is_dicomdir(ds) -> bool:
    return str(sop_class_uid(ds) or "") == DIRECTORY_SOP_CLASS


def describe_sop(ds) -> str:
    uid = sop_class_uid(ds)
    sop = f"SOP class {uid.name} ({uid})" if uid and uid.name != str(uid) else f"SOP class {printable(uid or 'unknown')}"
    modality = printable(str(ds.get("Modality", "") or "").strip() or "none")
    return f"{sop}, modality {modality}"


def fill_transfer_syntax(ds):
    """The data set's Transfer Syntax UID; for a raw data set without file meta, the encoding
    pydicom detected while reading is recorded as one (on this in-memory copy only)."""
    from pydicom import uid as uids
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if meta.get("TransferSyntaxUID") is None:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = uids.ImplicitVRLittleEndian if implicit else (
            uids.ExplicitVRLittleEndian if little else uids.ExplicitVRBigEndian
        )
    return meta.TransferSyntaxUID


def ensure_transfer_syntax(ds, name: str) -> None:
    """Check the pixel data can be decoded here; name the plugin that would decode it if not."""
    from pydicom.pixels import get_decoder

    syntax = fill_transfer_syntax(ds)
    label = f"transfer syntax {syntax.name} ({syntax})" if syntax.name != str(syntax) else f"transfer syntax {printable(syntax)}"
    if not syntax.is_transfer_syntax:
        raise ImageError(f"{name}: unsupported {label}: not a transfer syntax pydicom knows; {_CONVERT_HINT}")
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        hint = _VIDEO_HINT if _is_video(syntax) else _CONVERT_HINT
        raise ImageError(f"{name}: unsupported {label}: {hint}") from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies) or "a pixel-data plugin"
        raise ImageError(f"{name}: cannot decode {label}: install one of: {plugins}")


def _is_video(syntax) -> bool:
    return any(word in syntax.name for word in ("MPEG", "HEVC", "H.265"))


def decode_pixels(ds, name: str, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        pixels = ds.pixel_array  # YBR_FULL / YBR_FULL_422 come back as RGB
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: pixel data cannot be decoded ({short_reason(err)})") from None
    if photometric == "PALETTE COLOR":
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as err:
            raise ImageError(f"{name}: palette colour lookup failed ({short_reason(err)})") from None
    return np.ascontiguousarray(pixels)


def _positive_int(ds, keyword: str, name: str) -> int:
    value = ds.get(keyword)
    if value is None or int(value) <= 0:
        raise ImageError(f"{name}: missing or invalid {keyword} ({value!r})")
    return int(value)
