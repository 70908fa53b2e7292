"""A study on a DICOMweb store -> what MedGemma sees: a volume, a set of images, or slide patches.

    study = load_study(store, study_uid)             # StudyInput: kind "volume", "images" or "slide"
    content = study_content(study, "Findings?")      # chat content items, as for local files

The kind comes from the series' Modality (QIDO-RS): SM (whole-slide microscopy) -> `tile_slide`
patches; a CT / MR / PT / NM series of more than one slice (or a multi-frame one) -> `load_series`
(the <= 85-slice layout); anything else (CR, DX, MG, ...) -> each instance through `load_image`.
Without a series UID, a study of one series is that series, and a study whose series are all 2-D
images is all its images; otherwise the series must be named (the error lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openmedgemma.errors import ImageError, PacsError
from openmedgemma.imaging.image import MedicalImage

VOLUME_MODALITIES = ("CT", "MR", "PT", "NM")
SLIDE_MODALITY = "SM"
# The default instructions put first in the prompt (a caller's own `instruction` replaces them).
VOLUME_INSTRUCTION = "You are given {count} slices of one {modality} series, in order along the slice axis."
SLIDE_INSTRUCTION = "You are given {count} patches of one whole-slide image at {magnification:g}x, in spatial order."
DEFAULT_MAGNIFICATION = 10.0


@dataclass
class StudyInput:
    kind: str  # "volume", "images" or "slide"
    label: str  # URL path of the study or series: names it in messages
    volume: MedicalImage | None = None
    images: list[MedicalImage] = field(default_factory=list)
    patches: object = None  # SlidePatches for a slide


def load_study(store, study_uid: str, series_uid: str | None = None, *, magnification: float = DEFAULT_MAGNIFICATION,
               max_patches: int = 126, patch: int = 896, seed: int = 0,
               max_pixels: int | None = None) -> StudyInput:  # fmt: skip
    """Fetch a study (or one series of it) from `store` (an imaging.dicomweb.DicomWebSource); `max_pixels`
    caps the decoded samples of each image or volume (as for files)."""
    from openmedgemma.imaging.dicomweb import check_uid

    study_uid = check_uid(study_uid, "study UID")
    study_label = f"{store.url}/studies/{study_uid}"
    series = store.series(study_uid)
    if series_uid is not None:
        series_uid = check_uid(series_uid, "series UID")
        series = [s for s in series if s.series_uid == series_uid]
        if not series:
            raise PacsError(f"{study_label}/series/{series_uid}: no such series in the study")
    kinds = [_kind(s) for s in series]
    if len(series) > 1 and any(kind != "images" for kind in kinds):
        listing = "; ".join(f"{s.series_uid} ({s.modality or '?'}, {s.instance_count or '?'} instance(s), "
                            f"{s.description!r})" for s in series)  # fmt: skip
        raise PacsError(f"{study_label}: the study holds {len(series)} series; name one with --series "
                        f"(series_uid): {listing}")  # fmt: skip
    label = f"{study_label}/series/{series[0].series_uid}" if len(series) == 1 else study_label
    if kinds[0] == "slide":
        from openmedgemma.imaging.slide import tile_slide

        slide = store.open_slide(study_uid, series[0].series_uid)
        try:
            tiles = tile_slide(slide, magnification, max_patches, patch, seed, max_pixels=max_pixels)
        finally:
            slide.close()
        return StudyInput("slide", label, patches=tiles)
    members = [m for s in series for m in _complete_members(store, study_uid, s, study_label)]
    if kinds[0] == "volume":
        from openmedgemma.imaging.series import load_series

        volume = load_series(members, label=label, max_pixels=max_pixels)
        if volume.frames > 1:
            return StudyInput("volume", label, volume=volume)
    return StudyInput("images", label, images=_images(members, max_pixels))


def _complete_members(store, study_uid: str, series, study_label: str) -> list[tuple[str, bytes]]:
    """The series' instances, all of them: fewer than QIDO-RS counted is an error, not a partial answer."""
    members = store.series_members(study_uid, series.series_uid)
    if series.instance_count is not None and len(members) < series.instance_count:
        raise PacsError(f"{study_label}/series/{series.series_uid}: the server sent {len(members)} of the "
                        f"{series.instance_count} instances its search lists; not answering on part of a series")
    return members


def _kind(series) -> str:
    if series.modality == SLIDE_MODALITY:
        return "slide"
    return "volume" if series.modality in VOLUME_MODALITIES else "images"


def _images(members: list[tuple[str, bytes]], max_pixels: int | None = None) -> list[MedicalImage]:
    """Each instance through load_image, ordered by SeriesNumber then InstanceNumber (then name)."""
    from openmedgemma.imaging.dicom_io import read_dataset
    from openmedgemma.imaging.loader import load_image

    keyed = []
    for name, data in members:
        try:
            image = load_image(data, max_pixels=max_pixels)
        except ImageError as err:  # load_image names bytes "<bytes>": name the instance's URL path instead
            raise ImageError(str(err).replace("<bytes>", name, 1)) from None
        header = read_dataset(data)
        keyed.append(((*image_order_key(header), name), image.replace(source=name)))
    return [image for _, image in sorted(keyed, key=lambda item: item[0])]


def image_order_key(header) -> tuple[int, int]:
    """(SeriesNumber, InstanceNumber) of a DICOM header: the order a study's images are given in."""
    return _number(header, "SeriesNumber"), _number(header, "InstanceNumber")


def _number(header, keyword: str) -> int:
    try:
        return int(header.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def study_content(study: StudyInput, question: str, *, instruction: str | None = None, preset=None) -> list[dict]:
    """Chat content items: a volume in the 85-slice layout (instruction, SLICE n images, question),
    images then the question (as `ask --image`), or slide patches after an instruction."""
    if study.kind == "volume":
        return volume_content(study.volume, question, instruction=instruction, preset=preset)
    if study.kind == "slide":
        return slide_content(study.patches, question, instruction=instruction)
    from openmedgemma.imaging.windowing import to_rgb

    items = [{"type": "image", "image": to_rgb(image, preset) if preset else image} for image in study.images]
    return items + [{"type": "text", "text": question}]


def study_items(study: StudyInput, preset=None) -> list[dict]:
    """Image items without instruction or question (the server's layout for a request's image part): each
    image as RGB; a volume's <= 85 sampled slices each followed by "SLICE n"; slide patches in spatial order."""
    from openmedgemma.imaging.series import sample_slices
    from openmedgemma.imaging.windowing import to_rgb

    if study.kind == "slide":
        return [{"type": "image", "image": patch} for patch in study.patches.patches]
    if study.kind == "images":
        return [{"type": "image", "image": to_rgb(image, preset if image.modality == "CT" else None)}
                for image in study.images]  # fmt: skip
    volume = sample_slices(study.volume)
    items = []
    for number, rgb in enumerate(to_rgb(volume, preset if volume.modality == "CT" else None), start=1):
        items += [{"type": "image", "image": rgb}, {"type": "text", "text": f"SLICE {number}"}]
    return items


def volume_content(volume: MedicalImage, question: str, *, instruction: str | None = None, preset=None,
                   max_slices: int | None = None) -> list[dict]:  # fmt: skip
    """A CT / MR volume (from files or a store alike) as the MedGemma 1.5 volume prompt."""
    from openmedgemma.imaging.series import MAX_SLICES, volume_messages

    max_slices = max_slices or MAX_SLICES
    if instruction is None:
        instruction = VOLUME_INSTRUCTION.format(count=min(volume.frames, max_slices),
                                                 modality=volume.modality or "DICOM")
    return volume_messages(volume, instruction, question, preset=preset, max_slices=max_slices)


def slide_content(patches, question: str, *, instruction: str | None = None) -> list[dict]:
    """Slide patches (spatial order) after an instruction, then the question."""
    if instruction is None:
        instruction = SLIDE_INSTRUCTION.format(count=len(patches.patches), magnification=patches.magnification)
    items = [{"type": "text", "text": instruction}]
    items += [{"type": "image", "image": patch} for patch in patches.patches]
    return items + [{"type": "text", "text": question}]
