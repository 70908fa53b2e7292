"""Volumes and slide cases -> chat content: the one way the CLI, Python (`MedGemma.chat`) and the server
turn a CT / MR volume or the whole-slide images of a case into the images and labels MedGemma 1.5 reads.

Layouts (those of the official notebooks; see ../shared/reference/medgemma.md, section 2):
  volume: each sampled slice (at most 85, equidistant along the patient axis, in order along the slice
      normal) as an image followed by the text "SLICE n"; a single 2-D image gets no label.
  slides: every slide of the case tiled at one magnification; with several slides, "SLIDE k" before the
      patches of slide k (one slide: patches only, as the official pathology notebook); at most 126
      patches in all, a stratified subsample per slide, each slide's patches in spatial order.
The caller puts the instruction before these items and the question after them (the question must
come after the images: asked first, the 1.5 model answers CT volumes in X-ray report form).

Every item carries `group` = {"source", "unit"} so the engine can say how many slices fit a context.
In message content, {"type": "volume", "volume": SOURCE, ...options} and {"type": "slides", "slides":
[FILES], ...options} are expanded by `expand_content`, as are image items whose image is a folder, a
zip, a NIfTI or a multi-frame DICOM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.image import MedicalImage
from openmedgemma.imaging.series import MAX_SLICES
MAX_PATCHES = 126  # MedGemma 1.5: at most 126 patches per case
PATCH_SIZE = 896
DEFAULT_MAGNIFICATION = 10.0  # the official pathology notebook's level


@dataclass(frozen=True)
class PromptImages:
    """What a volume or a slide case becomes: chat content items, and the same images with one caption
    each (for previews); `summary` is what is reported back to the user (JSON-able)."""

    content: list[dict]
    images: list[np.ndarray]  # uint8 RGB, prompt order
    captions: list[str]  # per image: "SLICE n", "SLIDE k PATCH n", or "" for a lone image
    summary: dict[str, Any]
    warnings: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------- volumes


def volume_content(
    source,
    *,
    preset=None,
    max_slices: int = MAX_SLICES,
    series_uid: str | None = None,
    modality: str | None = None,
    **read_options,
) -> list[dict]:
    """Chat content items for a volume: [image, "SLICE 1", image, "SLICE 2", ...] (see the module doc);
    a 2-D image gives one image item, without a label.

    source: a DICOM series folder, a zip of one (path or bytes), a list of DICOM files, a multi-frame
    DICOM or NIfTI file (path or bytes), or a loaded MedicalImage. preset: CT window preset name
    ("medgemma" by default, "report-v4"; ignored for other modalities) or explicit (low, high) windows;
    series_uid picks one series of a folder or zip holding several; modality fills in formats without
    one (e.g. "CT" for a NIfTI in Hounsfield units). read_options: those of `read_volume` (label,
    max_pixels, zip caps), for sources a client sends.
    """
    return volume_input(source, preset=preset, max_slices=max_slices, series_uid=series_uid, modality=modality,
                        **read_options).content  # fmt: skip


def volume_input(
    source,
    *,
    preset=None,
    max_slices: int = MAX_SLICES,
    series_uid: str | None = None,
    modality: str | None = None,
    **read_options,
) -> PromptImages:
    """`volume_content` with the images, captions and summary (slice counts, preset) kept."""
    from openmedgemma.imaging.series import sample_slices, slice_items
    from openmedgemma.imaging.windowing import DEFAULT_CT_PRESET, to_rgb

    if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
        raise ImageError(f"max_slices must be a whole number of at least 1, got {max_slices!r}")
    image = read_volume(source, series_uid=series_uid, modality=modality, **read_options)
    label = image.source
    summary: dict[str, Any] = {"kind": "volume", "source": label, "modality": image.modality or None}
    is_ct = image.modality == "CT" and not image.is_colour
    if isinstance(preset, str) and not is_ct:
        preset = None  # a CT preset names CT windows; other modalities keep their own rule (MR: min-max)
    summary["preset"] = (preset or DEFAULT_CT_PRESET) if is_ct and not _is_windows(preset) else None
    if image.warnings:
        summary["warnings"] = list(image.warnings)
    if image.frames == 1 and image.pixels.ndim == (3 if image.is_colour else 2):
        rgb = to_rgb(image, preset)
        summary.update(kind="image", slices=1, total_slices=1)
        group = {"source": label, "unit": "images"}
        return PromptImages([{"type": "image", "image": rgb, "group": group}], [rgb], [""], summary, image.warnings)
    sampled = sample_slices(image, max_slices)
    rgb = list(to_rgb(sampled, preset))
    summary.update(slices=len(rgb), total_slices=image.frames, slice_indices=list(sampled.slice_indices))
    content = slice_items(rgb, group={"source": label, "unit": "slices"})
    captions = [f"SLICE {n}" for n in range(1, len(rgb) + 1)]
    return PromptImages(content, rgb, captions, summary, image.warnings)


def read_volume(
    source,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    label: str | None = None,
    max_pixels: int | None = None,
    max_members: int | None = None,
    max_bytes: int | None = None,
) -> MedicalImage:
    """A MedicalImage from any volume source `volume_content` takes (a 2-D image stays 2-D).

    label: the name used in messages for bytes (default "<bytes>"); max_pixels: decoded samples cap
    (sniff.DEFAULT_MAX_PIXELS); max_members / max_bytes: zip caps (imaging.archive's defaults)."""
    from openmedgemma.imaging import archive
    from openmedgemma.imaging.loader import load_image
    from openmedgemma.imaging.series import load_series

    if isinstance(source, MedicalImage):
        return source
    series = dict(series_uid=series_uid, max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if archive.is_zip(data[:4]):
            name = label or "<zip>"
            members = archive.read_zip(data, label=name, max_members=max_members or archive.MAX_MEMBERS,
                                       max_bytes=max_bytes or archive.MAX_BYTES)  # fmt: skip
            return _with_modality(load_series(members, label=name, **series), modality)
        image = load_image(data, modality=modality, max_pixels=max_pixels)
        return _single(image, label or "<bytes>", series_uid)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ImageError(f"{source}: no such file or folder")
        if path.is_dir() or _is_zip(path):
            return _with_modality(load_series(path, label=label, **series), modality)
        return _single(load_image(path, modality=modality, max_pixels=max_pixels), str(source), series_uid)
    if isinstance(source, Sequence):
        return _with_modality(load_series(list(source), label=label, **series), modality)
    raise ImageError("a volume is a folder, a zip, a DICOM / NIfTI file, bytes or a MedicalImage, "
                     f"got {type(source).__name__}")


def _is_zip(path: Path) -> bool:
    from openmedgemma.imaging.archive import is_zip

    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return is_zip(handle.read(4))


def _single(image: MedicalImage, name: str, series_uid: str | None) -> MedicalImage:
    if series_uid is not None and image.series_uid and image.series_uid != series_uid:
        raise ImageError(f"{name}: its SeriesInstanceUID is not {series_uid}")
    return image


def _with_modality(image: MedicalImage, modality: str | None) -> MedicalImage:
    return image.replace(modality=modality.upper()) if modality and not image.modality else image


def _is_windows(preset) -> bool:
    return preset is not None and not isinstance(preset, str)


# ---------------------------------------------------------------------- slides


def slides_content(
    sources,
    *,
    magnification: float = DEFAULT_MAGNIFICATION,
    max_patches: int = MAX_PATCHES,
    patch_size: int = PATCH_SIZE,
    seed: int = 0,
) -> list[dict]:
    """Chat content items for the whole-slide images of one case (see the module doc). sources: one slide
    file or a list of them (SVS, pyramidal TIFF, ... as tiffslide reads)."""
    return slides_input(sources, magnification=magnification, max_patches=max_patches, patch_size=patch_size,
                        seed=seed).content  # fmt: skip


def slides_input(
    sources,
    *,
    magnification: float = DEFAULT_MAGNIFICATION,
    max_patches: int = MAX_PATCHES,
    patch_size: int = PATCH_SIZE,
    seed: int = 0,
) -> PromptImages:
    """`slides_content` with the images, captions and summary (patches per slide) kept."""
    from openmedgemma.imaging.slide import tile_case

    paths = [sources] if isinstance(sources, (str, Path)) else list(sources)
    for path in paths:
        if not isinstance(path, (str, Path)):
            raise ImageError(f"slides are read from files; got {type(path).__name__}")
    tiled = tile_case(paths, magnification, max_patches, patch_size, seed)
    label = paths[0] if len(paths) == 1 else f"{len(paths)} slides"
    group = {"source": str(label), "unit": "patches"}
    content, images, captions = [], [], []
    for k, slide in enumerate(tiled, start=1):
        if len(tiled) > 1:
            content.append({"type": "text", "text": f"SLIDE {k}", "group": group})
        for n, patch in enumerate(slide.patches, start=1):
            content.append({"type": "image", "image": patch, "group": group})
            images.append(patch)
            captions.append(f"SLIDE {k} PATCH {n}")
    summary = {
        "kind": "slides",
        "source": str(label),
        "magnification": float(magnification),
        "patch_size": patch_size,
        "patches": len(images),
        "slides": [
            {"source": s.source, "patches": len(s.patches), "tissue_patches": s.tissue_patches,
             "base_magnification": s.base_magnification, "grid": list(s.grid_shape),
             "coordinates": [list(xy) for xy in s.coordinates]}  # level-0 (x, y) of each patch
            for s in tiled
        ],
    }  # fmt: skip
    return PromptImages(content, images, captions, summary)


# ---------------------------------------------------------------------- message content


VOLUME_OPTIONS = ("preset", "max_slices", "series_uid", "modality")
SLIDE_OPTIONS = ("magnification", "max_patches", "patch_size", "seed")


def expand_content(messages):
    """(messages with volumes and slide cases replaced by their items, the summaries of those expanded).

    Expanded: {"type": "volume", "volume": SOURCE, options...}, {"type": "slides", "slides": FILES,
    options...}, and image items whose image is a folder, a zip, a NIfTI, a multi-frame DICOM or a
    MedicalImage volume. Anything else is returned as it is (the tokenizer reports format errors).
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        return messages, []
    out, summaries, changed = [], [], False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (str, bytes, Mapping)) or not isinstance(content, Sequence):
            out.append(message)
            continue
        items = []
        for item in content:
            expanded = _expand_item(item)
            if expanded is None:
                items.append(item)
            else:
                items += expanded.content
                summaries.append(expanded.summary)
                changed = True
        out.append({**message, "content": items})
    return (out if changed else messages), summaries


def _expand_item(item) -> PromptImages | None:
    if not isinstance(item, Mapping):
        return None
    kind = item.get("type")
    if kind == "volume":
        _check_options(item, "volume", VOLUME_OPTIONS)
        return volume_input(item.get("volume"), **{k: item[k] for k in VOLUME_OPTIONS if k in item})
    if kind == "slides":
        _check_options(item, "slides", SLIDE_OPTIONS)
        return slides_input(item.get("slides"), **{k: item[k] for k in SLIDE_OPTIONS if k in item})
    if kind == "image" and "group" not in item:
        image = item.get("image")
        if is_volume_source(image):
            return volume_input(image)
    return None


def _check_options(item: Mapping, kind: str, allowed: tuple[str, ...]) -> None:
    if item.get(kind) is None:
        raise ImageError(f"a {kind!r} content item needs its source under {kind!r}")
    unknown = sorted(set(item) - {"type", kind, *allowed})
    if unknown:
        raise ImageError(f"a {kind!r} content item takes {', '.join(allowed)}; unknown: {', '.join(unknown)}")


def is_volume_source(image) -> bool:
    """A folder, a zip, a NIfTI, a multi-frame DICOM or a MedicalImage volume (cheap checks: headers only)."""
    if isinstance(image, MedicalImage):
        return image.frames > 1
    if not isinstance(image, (str, Path)) or str(image).startswith(("http://", "https://")):
        return False
    path = Path(image).expanduser()
    if path.is_dir() or _is_zip(path):
        return True
    if not path.is_file():
        return False
    from openmedgemma.imaging.sniff import sniff_format

    kind = sniff_format(path)
    if kind == "nifti":
        return True
    if kind == "dicom":
        import pydicom

        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
            return int(header.get("NumberOfFrames") or 1) > 1
        except Exception:
            return False  # the image loader reports what is wrong
    return False


def without_group(messages, source: str) -> list:
    """`messages` without the items of the volume / slide case `source` (to measure the rest)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            content = [i for i in content if not (isinstance(i, Mapping) and _source_of(i) == source)]
            if not content:
                content = ""
        out.append({**message, "content": content})
    return out


def _source_of(item: Mapping):
    return (item.get("group") or {}).get("source")


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], tile: int | None = None) -> np.ndarray:
    """One uint8 RGB image: the images row-major on a grid ceil(sqrt(n)) wide, each with its caption
    drawn in its top-left corner. tile: each image's side in the sheet (None: the largest image's)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ImageError("contact sheet: no images")
    side = tile or max(max(im.shape[:2]) for im in images)
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * side, rows * side))
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, captions)):
        r, c = divmod(index, columns)
        picture = Image.fromarray(np.ascontiguousarray(image))
        if max(picture.size) != side:
            scale = side / max(picture.size)
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                     Image.BILINEAR)  # fmt: skip
        sheet.paste(picture, (c * side, r * side))
        if caption:
            x, y = c * side + 2, r * side + 2
            box = draw.textbbox((x, y), caption)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.text((x, y), caption, fill=(255, 255, 0))
    return np.asarray(sheet)
