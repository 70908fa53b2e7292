"""DICOM whole-slide images (VL Whole Slide Microscopy) for `tile_slide`, from a folder or a DICOMweb store.

`wsidicom` reads both; `DicomSlide` gives it the small openslide-like face `imaging.slide` tiles with
(level-0 coordinates, per-level sizes and downsamples, best level for a downsample), so the tissue
mask, grid, magnification choice and patch reads are the same code as for a TIFF slide. Over
DICOMweb wsidicom fetches frames (tiles) one WADO-RS request at a time, so only the tiles of the
level used for the mask and of the patches read are transferred.
"""

from __future__ import annotations

import logging
from pathlib import Path

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_io import short_reason


class DicomSlide:
    """An open wsidicom slide with the members `imaging.slide` reads; `name` labels messages."""

    def __init__(self, wsi, name: str):
        self.wsi, self.name = wsi, name
        levels = list(wsi.levels)
        base = levels[0].size
        self.dimensions = (base.width, base.height)
        self.level_dimensions = [(level.size.width, level.size.height) for level in levels]
        self.level_downsamples = [base.width / width for width, _ in self.level_dimensions]
        self._level_numbers = [level.level for level in levels]  # wsidicom's own: log2 of the scale
        self.properties = {}  # tiffslide's keys, read by slide.base_magnification
        power = _objective_power(levels[0])
        if power:
            self.properties["tiffslide.objective-power"] = power
        if wsi.mpp is not None and wsi.mpp.width:
            self.properties["tiffslide.mpp-x"] = float(wsi.mpp.width)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level that still has at least the resolution asked (as openslide)."""
        best = 0
        for index, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * (1 + 1e-6):
                best = index
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """RGBA-free PIL image of `size` at `level`, `location` in level-0 pixels (as openslide)."""
        downsample = self.level_downsamples[level]
        x, y = (int(round(v / downsample)) for v in location)
        return self.wsi.read_region((x, y), self._level_numbers[level], tuple(int(v) for v in size))

    def close(self) -> None:
        self.wsi.close()


def open_folder_slide(folder: str | Path) -> DicomSlide:
    """The DICOM WSI in a folder (one slide: its pyramid levels, maybe label / overview)."""
    from wsidicom import WsiDicom

    name = str(folder)
    try:
        return DicomSlide(WsiDicom.open(Path(folder)), name)
    except Exception as err:  # wsidicom raises many types on folders that hold no (complete) WSI
        raise ImageError(f"{name}: not a readable DICOM whole-slide image folder ({short_reason(err)})") from None


def open_web_slide(client, study_uid: str, series_uid: str, name: str, transfer_syntax: str | None = None) -> DicomSlide:
    """The DICOM WSI of one series on a DICOMweb store (`client`: a dicomweb_client DICOMwebClient), its
    tiles asked for in `transfer_syntax` (the stored one, when known), else in wsidicom's preferred one.

    HTTP errors propagate for the caller to name (imaging.dicomweb); anything else is an ImageError."""
    import requests
    from wsidicom import WsiDicom, WsiDicomWebClient

    quiet = logging.getLogger("pydicom")  # pydicom logs each bulk-data URI of the JSON metadata it leaves unread
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        wsi = WsiDicom.open_web(WsiDicomWebClient(client), study_uid, series_uid, transfer_syntax)
        return DicomSlide(wsi, name)
    except requests.RequestException:
        raise
    except Exception as err:
        raise ImageError(f"{name}: not a readable DICOM whole-slide image series ({short_reason(err)})") from None
    finally:
        quiet.setLevel(level)


WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _objective_power(level) -> float | None:
    try:
        dataset = level.datasets[0]
        for item in dataset.get("OpticalPathSequence", []) or []:
            power = item.get("ObjectiveLensPower")
            if power is not None and float(power) > 0:
                return float(power)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return None
