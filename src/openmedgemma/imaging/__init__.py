"""openmedgemma.imaging: DICOM / PNG / JPEG / TIFF / NIfTI / whole-slide -> MedGemma input.

    image = load_image("ct.dcm")                 # MedicalImage
    rgb = to_rgb(image)                           # uint8 [H, W, 3], CT windows into R, G, B
    pixel_values = to_pixel_values([rgb])         # torch [1, 3, 896, 896], as Gemma3ImageProcessor

    volume = load_series("series_folder/")        # sorted along the slice normal
    content = volume_messages(volume, instruction, question)   # <= 85 slices, "SLICE n" labels
    items = volume_content("ct.zip", preset="medgemma")           # the same from a folder / zip / NIfTI / bytes
    items = slides_content(["a.svs", "b.svs"], magnification=10)   # a case: <= 126 patches, "SLIDE k"

Exports resolve lazily so that importing the package (and the CLI) stays fast and torch-free.
"""

from __future__ import annotations

from openmedgemma.lazy import lazy_exports

_EXPORTS = {
    # the errors its functions raise, importable where they are called
    "ImageError": "openmedgemma.errors",
    "OpenMedGemmaError": "openmedgemma.errors",
    "MedicalImage": "image",
    "VOILUT": "image",
    "load_image": "loader",
    "to_rgb": "windowing",
    "PRESETS": "windowing",
    "load_series": "series",
    "sample_slices": "series",
    "sample_indices": "series",
    "volume_messages": "series",
    "pad_to_square": "pixel_values",
    "to_pixel_values": "pixel_values",
    "tile_slide": "slide",
    "tile_case": "slide",
    "volume_content": "inputs",
    "volume_input": "inputs",
    "slides_content": "inputs",
    "slides_input": "inputs",
    "PromptImages": "inputs",
    "SlidePatches": "slide",
    "deidentify": "deid",
    "UIDMapper": "deid",
    "DEFAULT_MAX_PIXELS": "sniff",
    "DicomWebSource": "dicomweb",
    "load_study": "pacs",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
