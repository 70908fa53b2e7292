"""`load_image`: any supported file (or its bytes) -> MedicalImage, or an ImageError."""

from __future__ import annotations

from pathlib import Path

from openmedgemma.imaging.image import MedicalImage
from openmedgemma.imaging.sniff import sniff_format


def load_image(
    source: str | Path | bytes,
    *,
    modality: str | None = None,
    max_pixels: int | None = None,
) -> MedicalImage:
    """Read a DICOM (single or multi-frame), PNG, JPEG, TIFF (8/16 bit) or NIfTI file.

    The format is decided from the content (magic bytes), not the extension. `modality` fills in
    the modality of formats that have none (PNG, JPEG, TIFF, NIfTI), e.g. "CT" for a Hounsfield
    NIfTI volume or "CR" for an X-ray PNG; a DICOM file's own Modality wins when it has one.
    `max_pixels` caps the total number of pixel samples decoded (sniff.DEFAULT_MAX_PIXELS).
    """
    file_format = sniff_format(source)
    if file_format == "dicom":
        from openmedgemma.imaging.dicom_io import load_dicom

        image = load_dicom(source, max_pixels=max_pixels)
    elif file_format == "nifti":
        from openmedgemma.imaging.nifti_io import load_nifti

        return load_nifti(source, modality=modality, max_pixels=max_pixels)
    elif file_format == "tiff":
        from openmedgemma.imaging.raster_io import load_tiff

        image = load_tiff(source, max_pixels=max_pixels)
    else:
        from openmedgemma.imaging.raster_io import load_pil_image

        image = load_pil_image(source, file_format, max_pixels=max_pixels)
    if modality and not image.modality:
        image = image.replace(modality=modality.upper())
    return image
