"""NIfTI (.nii / .nii.gz) -> MedicalImage volume of axial slices in radiological display.

The volume is reoriented to RAS (nearest axes, no resampling), then laid out as DICOM axial
images usually are: slice 0 is the most inferior, image rows run anterior -> posterior and
columns patient right -> left (image left = patient right). Stored values and the header's
scl_slope / scl_inter are kept separately, like a DICOM rescale. NIfTI has no modality: pass
`modality` ("CT" for a Hounsfield volume), or it is read from a BIDS sidecar JSON beside the file.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_io import short_reason
from openmedgemma.imaging.image import MedicalImage
from openmedgemma.imaging.sniff import check_pixel_count, describe


def load_nifti(source: str | Path | bytes, *, modality: str | None = None, max_pixels: int | None = None) -> MedicalImage:
    name = describe(source)
    try:
        img = _open(source)
        shape = tuple(int(n) for n in img.shape)
        check_pixel_count(name, int(np.prod(shape)), max_pixels)
        raw = np.asarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else np.asarray(img.dataobj)
        slope, inter = _scaling(img)
        affine = img.affine
    except ImageError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, ValueError...
        raise ImageError(f"{name}: corrupt or truncated NIfTI ({short_reason(err)})") from None
    raw = _squeeze_to_volume(name, raw)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ImageError(f"{name}: NIfTI data contains NaN or infinite values")
    if not np.isfinite(affine).all():
        raise ImageError(f"{name}: NIfTI affine is not finite")
    volume, spacing = to_display_volume(raw, affine)
    return MedicalImage(
        pixels=volume,
        modality=(modality or sidecar_modality(source) or "").upper(),
        photometric="MONOCHROME2",
        source=name,
        file_format="nifti",
        spacing=spacing,
        rescale_slope=slope,
        rescale_intercept=inter,
    )


def _open(source):
    import nibabel as nib

    if not isinstance(source, (bytes, bytearray, memoryview)):
        return nib.load(str(source))
    data = bytes(source)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    klass = nib.Nifti2Image if data[4:8] in (b"n+2\x00", b"ni2\x00") or data[344:348] == b"n+2\x00" else nib.Nifti1Image
    return klass.from_bytes(data)


def _scaling(img) -> tuple[float | None, float | None]:
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if slope is None or not math.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not math.isfinite(inter) else float(inter)
    return slope, inter


def _squeeze_to_volume(name: str, raw: np.ndarray) -> np.ndarray:
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = raw[:, :, None]
    if raw.ndim != 3:
        raise ImageError(f"{name}: NIfTI of shape {raw.shape} is not a 3-D volume (time series are not supported)")
    return raw


def to_display_volume(raw: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """[slices, rows, columns] in radiological axial display, and its (dz, dy, dx) spacing."""
    from nibabel import orientations

    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(("R", "A", "S")))
    ras = orientations.apply_orientation(raw, transform)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_zooms = np.empty(3)
    for axis in range(3):
        ras_zooms[int(current[axis, 0])] = zooms[axis]
    # ras[i, j, k]: i increases to patient right, j anterior, k superior.
    volume = np.ascontiguousarray(np.transpose(ras[::-1, ::-1, :], (2, 1, 0)))
    return volume, (float(ras_zooms[2]), float(ras_zooms[1]), float(ras_zooms[0]))


def sidecar_modality(source) -> str | None:
    """The "Modality" of a BIDS JSON sidecar (same name, .json) beside the file, if any."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return None
    path = Path(source)
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    sidecar = path.with_name(stem + ".json")
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8")).get("Modality")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
