"""Images in requests: `data:` URIs -> chat content items, through the same imaging code as files.

An `image_url` part may carry PNG or JPEG, a DICOM file (`application/dicom`; a multi-frame file is a
volume) or a zip of one DICOM series (`application/zip`, read in memory by `imaging.archive`). The
content decides the format (magic bytes), not the declared type. A volume becomes the MedGemma 1.5
layout: at most 85 slices sampled along the patient axis, each an image followed by "SLICE n". CT is
windowed into R, G, B with the request's `ct_preset`. http(s) and file URLs are refused: the server
makes no network requests and reads no files named by a client.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import numpy as np

from openmedgemma.errors import ImageError, OpenMedGemmaError

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?),", re.IGNORECASE)


class MediaError(OpenMedGemmaError):
    """A request's image cannot be used; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaLimits:
    """max_pixels: decoded samples per image or volume (decompression bombs); zip caps: `imaging.archive`."""

    max_pixels: int = 64 << 20
    zip_members: int = 2048
    zip_bytes: int = 512 << 20


def decode_data_uri(url: str, field: str) -> bytes:
    """The bytes of a base64 `data:` URI; MediaError naming `field` for anything else."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{field}: an image URL is required", field)
    lower = url[:16].lower()
    if lower.startswith(("http://", "https://", "file:", "ftp:")):
        raise MediaError(
            f"{field}: only data: URIs are accepted (base64 PNG, JPEG, DICOM or a zip of a DICOM series); "
            "this server makes no network requests and reads no files a client names", field)  # fmt: skip
    match = _DATA_URI.match(url)
    if not match:
        raise MediaError(f"{field}: not a data: URI (expected data:<type>;base64,<data>)", field)
    if "base64" not in match.group("params").lower():
        raise MediaError(f"{field}: the data: URI must be base64-encoded (';base64,')", field)
    try:
        data = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{field}: the data: URI's base64 is invalid", field) from None
    if not data:
        raise MediaError(f"{field}: the data: URI is empty", field)
    return data


def content_from_image_url(url: str, *, preset: str | None = None, field: str = "image_url",
                           limits: MediaLimits = MediaLimits()) -> list[dict]:  # fmt: skip
    """Chat content items for one image_url: {"type": "image", "image": uint8 RGB [H, W, 3]} per image
    (the image before the model's resize), each slice of a volume followed by {"type": "text", "text":
    "SLICE n"}. MediaError (naming `field`) for a corrupt, unsupported or oversized image."""
    data = decode_data_uri(url, field)
    try:
        return _content(data, preset, field, limits)
    except ImageError as err:
        raise MediaError(_named(str(err), field), field) from None


def _named(message: str, field: str) -> str:
    """The imaging message with the request field as its subject (imaging calls bytes "<bytes>")."""
    if message.startswith(field):
        return message
    if message.startswith("<bytes>: "):
        return f"{field}: {message[len('<bytes>: '):]}"
    return f"{field}: {message}"


def _content(data: bytes, preset: str | None, field: str, limits: MediaLimits) -> list[dict]:
    from openmedgemma.imaging.archive import is_zip
    from openmedgemma.imaging.loader import load_image
    from openmedgemma.imaging.series import load_series, sample_slices
    from openmedgemma.imaging.windowing import to_rgb

    if is_zip(data[:4]):
        from openmedgemma.imaging.archive import read_zip

        members = read_zip(data, label=field, max_members=limits.zip_members, max_bytes=limits.zip_bytes)
        image = load_series(members, label=field, max_pixels=limits.max_pixels)
    else:
        image = load_image(data, max_pixels=limits.max_pixels)
    is_volume = image.pixels.ndim == (4 if image.is_colour else 3)
    if is_volume:
        image = sample_slices(image)
    rgb = to_rgb(image, preset if image.modality == "CT" else None)
    if not is_volume:
        return [{"type": "image", "image": np.ascontiguousarray(rgb)}]
    items = []
    for number, slice_rgb in enumerate(rgb, start=1):
        items.append({"type": "image", "image": np.ascontiguousarray(slice_rgb)})
        items.append({"type": "text", "text": f"SLICE {number}"})
    return items
