"""`MedicalImage`: pixels plus the header facts that decide how they become RGB.

One class serves a 2-D image, a multi-frame file and a sorted series (a volume): `pixels` is
[H, W] or [H, W, 3] for one image, [N, H, W] or [N, H, W, 3] for N frames / slices. Pixel values
are kept as stored in the file; `modality_values()` applies the rescale (Hounsfield units for CT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

# Photometric interpretations whose pixels are (after loading) three RGB samples.
COLOUR_PHOTOMETRICS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
)


@dataclass(frozen=True)
class VOILUT:
    """A DICOM VOI LUT (PS3.3 C.11.2.1.1): input values from `first_mapped` on index `table`."""

    first_mapped: int
    table: np.ndarray  # 1-D, unsigned
    bits: int  # bits per entry from the LUT Descriptor: the output range is 0 .. 2**bits - 1


@dataclass(frozen=True)
class MedicalImage:
    """A decoded medical image and the facts needed to display it as the model expects.

    pixels: stored values. Grayscale as [H, W] or [N, H, W]; colour as [..., 3] RGB (YBR and
        palette colour are converted to RGB when loading; `photometric` keeps the file's value).
    modality: DICOM Modality ("CT", "MR", "CR", "DX", ...) or "" when the format has none.
    photometric: "MONOCHROME1", "MONOCHROME2", "RGB", or the file's colour interpretation.
    spacing: millimetres, (row, column) for 2-D or (slice, row, column) for a volume; None if unknown.
    rescale_slope / rescale_intercept: modality LUT; None when absent from the file. A volume whose
        slices differ carries one value per slice (1-D arrays).
    window_center / window_width / voi_lut_function: the file's first VOI window, if any.
    voi_lut: the file's first VOI LUT (VOI LUT Sequence), if any.
    intensity_range: (min, max) of modality values of the whole volume this image was cut from;
        sampling slices keeps it so MR min-max normalisation covers the whole volume.
    source: the file path, or "<bytes>"; file_format: "dicom", "png", "jpeg", "tiff", "nifti".
    slice_positions / source_files / slice_indices: per slice of a series (see `load_series`).
    warnings: problems found that did not stop loading (duplicate positions, gaps, ...).
    """

    pixels: np.ndarray
    modality: str
    photometric: str
    source: str
    file_format: str
    spacing: tuple[float, ...] | None = None
    rescale_slope: float | np.ndarray | None = None
    rescale_intercept: float | np.ndarray | None = None
    window_center: float | None = None
    window_width: float | None = None
    voi_lut_function: str = "LINEAR"
    voi_lut: VOILUT | None = None
    intensity_range: tuple[float, float] | None = None
    series_uid: str = ""
    slice_positions: np.ndarray | None = None
    source_files: tuple[str, ...] = ()
    slice_indices: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_colour(self) -> bool:
        return self.photometric in COLOUR_PHOTOMETRICS

    @property
    def has_voi_lut(self) -> bool:
        return self.voi_lut is not None

    @property
    def frames(self) -> int:
        """Number of frames / slices (1 for a 2-D image)."""
        return self.pixels.shape[0] if self.pixels.ndim == (4 if self.is_colour else 3) else 1

    def modality_values(self) -> np.ndarray:
        """Pixel values after the modality LUT (Hounsfield units for CT) as float64."""
        values = self.pixels.astype(np.float64)
        slope, intercept = self.rescale_slope, self.rescale_intercept
        if slope is None and intercept is None:
            return values
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if np.ndim(slope) == 1 or np.ndim(intercept) == 1:
            shape = (-1,) + (1,) * (values.ndim - 1)
            slope = np.broadcast_to(np.asarray(slope, dtype=np.float64), (self.frames,))
            intercept = np.broadcast_to(np.asarray(intercept, dtype=np.float64), (self.frames,))
            return values * slope.reshape(shape) + intercept.reshape(shape)
        return values * float(slope) + float(intercept)

    def replace(self, **changes) -> MedicalImage:
        return dataclasses.replace(self, **changes)
