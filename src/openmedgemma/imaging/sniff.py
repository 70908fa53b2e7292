"""Decide a file's format from its content (magic bytes), falling back on its extension.

Content wins over the extension: a JPEG named `.png` is read as JPEG. A file whose content
matches no format we read is refused with a message naming the extension and what was tried.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from openmedgemma.errors import ImageError

# Refuse images with more than this many pixel samples in total (all frames and channels
# counted) before decoding them: a small compressed file can declare a huge image.
DEFAULT_MAX_PIXELS = 1 << 28  # 268,435,456 samples (512 MiB as int16)

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", ".ima")
KNOWN_EXTENSIONS = DICOM_EXTENSIONS + (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".nii", ".nii.gz",
)

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GZIP = b"\x1f\x8b"
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")


def printable(value) -> str:
    """A header value fit for a one-line message: control characters become '?', max 120 chars."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text if len(text) <= 120 else text[:117] + "..."


def describe(source: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def read_head(source: str | Path | bytes, size: int = 1024) -> bytes:
    """The first `size` bytes; ImageError for a missing, unreadable or empty file."""
    name = describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:size])
    else:
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image file (use load_series for a series)")
        try:
            with path.open("rb") as handle:
                head = handle.read(size)
        except FileNotFoundError:
            raise ImageError(f"{name}: file not found") from None
        except OSError as err:
            raise ImageError(f"{name}: cannot be read ({err.strerror or err})") from None
    if not head:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return head


def _looks_like_nifti(head: bytes) -> bool:
    return len(head) >= 348 and (head[344:348] in _NIFTI_MAGIC or head[4:8] in _NIFTI_MAGIC)


def _gunzip_head(head: bytes) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
    except zlib.error:
        return b""


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble starts with a group 0002 or 0008 tag."""
    return head[:2] in (b"\x02\x00", b"\x08\x00")


def extension(source: str | Path | bytes) -> str:
    """Lower-case extension, ".nii.gz" kept whole; "" for bytes or a name without one."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ""
    name = Path(source).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def sniff_format(source: str | Path | bytes) -> str:
    """Return "dicom", "png", "jpeg", "tiff" or "nifti", or raise ImageError saying why not."""
    name = describe(source)
    head = read_head(source, 1024)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    if head[:4] in _TIFF:
        return "tiff"
    if _looks_like_nifti(head):
        return "nifti"
    if head.startswith(_GZIP) and _looks_like_nifti(_gunzip_head(head)):
        return "nifti"
    suffix = extension(source)
    if _looks_like_raw_dicom(head) and (suffix in DICOM_EXTENSIONS or suffix == ""):
        return "dicom"
    if suffix in KNOWN_EXTENSIONS:
        raise ImageError(
            f"{name}: content does not match its extension {suffix!r} "
            "(no PNG/JPEG/TIFF signature, no DICOM 'DICM' marker at byte 128, no NIfTI header): "
            "the file is corrupt or mislabelled"
        )
    shown = repr(suffix) if suffix else "no extension"
    raise ImageError(
        f"{name}: unsupported file type ({shown}); the content matches none of DICOM, PNG, JPEG, "
        "TIFF or NIfTI"
    )


def check_pixel_count(name: str, count: int, max_pixels: int | None) -> None:
    """Refuse an image declaring more than `max_pixels` samples (a decompression bomb guard)."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if count > limit:
        raise ImageError(
            f"{name}: image declares {count:,} pixel samples, above the limit of {limit:,} "
            "(possible decompression bomb; raise max_pixels if the file is trusted)"
        )
