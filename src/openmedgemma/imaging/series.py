"""DICOM series -> volume, slice sampling and the interleaved chat content for CT / MR volumes.

Slices are ordered by their position along the slice normal (ImagePositionPatient . normal, the
normal being the cross product of the two ImageOrientationPatient directions), never by file
name; InstanceNumber only breaks ties, or orders slices that carry no position (with a warning).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.dicom_io import dataset_to_image, is_dicomdir, read_dataset, short_reason
from openmedgemma.imaging.image import MedicalImage
from openmedgemma.imaging.archive import is_zip, read_zip
from openmedgemma.imaging.sniff import describe, printable, read_head, sniff_format
from openmedgemma.imaging.windowing import to_rgb

MAX_SLICES = 85  # MedGemma 1.5: at most 85 slices per volume


def load_series(
    source: str | Path | bytes | Iterable[str | Path | tuple[str, bytes]],
    *,
    series_uid: str | None = None,
    max_pixels: int | None = None,
    label: str | None = None,
) -> MedicalImage:
    """Load one DICOM series from a folder (searched recursively), a zip archive (a .zip path or
    its bytes, read in memory: `imaging.archive`), a list of files, or a list of in-memory
    (name, bytes) members.

    A folder or archive holding several series is an error unless `series_uid` picks one. Non-DICOM
    files and DICOMDIR indexes in a folder or archive are skipped (noted in `warnings`); in an explicit
    list they are errors. `label` names the source in messages (default: the path). Returns a
    MedicalImage with pixels [slices, rows, columns].
    """
    files, skipped, label = _collect(source, label)
    datasets = [(path, _read(path, data)) for path, data in files]
    datasets = [(p, ds) for p, ds in datasets if not is_dicomdir(ds)]
    skipped += len(files) - len(datasets)
    chosen = _pick_series(label, datasets, series_uid)
    images = [_decode(path, ds, max_pixels) for path, ds in chosen]
    warnings = [f"skipped {skipped} file(s) that are not DICOM images"] if skipped else []
    return _assemble(label, chosen, images, warnings)


def _collect(source, label: str | None) -> tuple[list[tuple[str, Path | bytes]], int, str]:
    """(name, path or bytes) of each DICOM member, how many others were skipped, and the label."""
    if isinstance(source, (bytes, bytearray, memoryview)) or (
        isinstance(source, (str, Path)) and Path(source).is_file() and is_zip(read_head(source, 4))
    ):
        label = label or describe(source)
        data = source if not isinstance(source, (str, Path)) else _read_file(Path(source))
        return _dicom_members(read_zip(bytes(data), label=label), label, strict=False)
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.is_dir():
            raise ImageError(f"{root}: not a folder or zip archive (load_series takes a folder, a zip or a list "
                             "of files)")  # fmt: skip
        candidates = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return _dicom_members([(str(p), p) for p in candidates], label or str(root), strict=False)
    items = list(source)
    if not items:
        raise ImageError(f"{label or 'load_series'}: empty list of files")
    if all(isinstance(item, tuple) for item in items):
        return _dicom_members(items, label or f"<{len(items)} in-memory files>", strict=True)
    files = [Path(p) for p in items]
    return _dicom_members([(str(p), p) for p in files], label or f"{files[0].parent} ({len(files)} files)",
                          strict=True)  # fmt: skip


def _dicom_members(items: list, label: str, strict: bool) -> tuple[list, int, str]:
    """Keep the DICOM members; `strict`: any other member is an error, else it is skipped."""
    kept = []
    for name, data in items:
        try:
            is_dicom = sniff_format(data) == "dicom"
        except ImageError as err:
            if strict:
                raise ImageError(f"{name}: {str(err).split(': ', 1)[-1]}") from None
            is_dicom = False
        if is_dicom:
            kept.append((str(name), data))
        elif strict:
            raise ImageError(f"{name}: not a DICOM file (a series is made of DICOM files)")
    if not kept:
        raise ImageError(f"{label}: no DICOM files found")
    return kept, len(items) - len(kept), label


def _read(name: str, data: Path | bytes):
    """The member's pydicom Dataset, errors naming the member (not "<bytes>")."""
    try:
        return read_dataset(data)
    except ImageError as err:
        raise ImageError(f"{name}: {str(err).split(': ', 1)[-1]}") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot be read ({err.strerror or err})") from None


def _pick_series(label: str, datasets: list, series_uid: str | None) -> list:
    groups: dict[str, list] = defaultdict(list)
    for path, ds in datasets:
        groups[str(ds.get("SeriesInstanceUID", "") or "")].append((path, ds))
    if series_uid is not None:
        if series_uid not in groups:
            found = ", ".join(printable(uid) for uid in sorted(groups))
            raise ImageError(f"{label}: no series with SeriesInstanceUID {series_uid}; found {found}")
        return groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(
            f"{printable(uid or '(none)')}: {len(items)} file(s) {str(items[0][1].get('SeriesDescription', '') or '')!r}"
            for uid, items in sorted(groups.items())
        )
        raise ImageError(
            f"{label}: files from {len(groups)} series mixed (SeriesInstanceUID {listing}); "
            "pass series_uid to pick one"
        )
    if not groups:
        raise ImageError(f"{label}: no DICOM images found")
    return next(iter(groups.values()))


def _decode(path: Path, ds, max_pixels: int | None) -> MedicalImage:
    try:
        return dataset_to_image(ds, str(path), max_pixels=max_pixels)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{path}: corrupt or truncated DICOM ({short_reason(err)})") from None


def _geometry(path: Path, ds) -> tuple[np.ndarray, np.ndarray] | None:
    """(orientation [6], position [3]) of a single-frame slice, None when either is absent."""
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or position is None:
        return None
    try:
        o = np.array([float(v) for v in orientation], dtype=np.float64)
        p = np.array([float(v) for v in position], dtype=np.float64)
    except (TypeError, ValueError):
        raise ImageError(f"{path}: ImageOrientationPatient / ImagePositionPatient are not numbers") from None
    if o.shape != (6,) or p.shape != (3,) or not (np.isfinite(o).all() and np.isfinite(p).all()):
        raise ImageError(f"{path}: malformed ImageOrientationPatient / ImagePositionPatient")
    return o, p


def _assemble(label: str, chosen: list, images: list[MedicalImage], warnings: list[str]) -> MedicalImage:
    first = images[0]
    if any(image.frames != 1 for image in images):
        if len(images) != 1:
            raise ImageError(f"{label}: a series mixing multi-frame files is not supported")
        return first.replace(intensity_range=_range(first), slice_indices=tuple(range(first.frames)))
    for (path, _), image in zip(chosen, images):
        if image.pixels.shape != first.pixels.shape or image.photometric != first.photometric:
            raise ImageError(
                f"{path}: slice is {image.pixels.shape} {image.photometric}, the series' first slice "
                f"is {first.pixels.shape} {first.photometric}"
            )
        if image.modality != first.modality:
            raise ImageError(f"{path}: modality {image.modality!r} differs from the series' {first.modality!r}")
    order, positions, warnings = _order(chosen, warnings)
    images = [images[i] for i in order]
    files = tuple(str(chosen[i][0]) for i in order)
    spacing_z = _slice_spacing(positions, chosen[order[0]][1])
    slopes = [image.rescale_slope for image in images]
    intercepts = [image.rescale_intercept for image in images]
    volume = first.replace(
        pixels=np.stack([image.pixels for image in images]),
        source=label,
        spacing=(spacing_z, *first.spacing) if first.spacing else None,
        rescale_slope=_per_slice(slopes, label),
        rescale_intercept=_per_slice(intercepts, label),
        slice_positions=positions,
        source_files=files,
        slice_indices=tuple(range(len(images))),
        warnings=tuple(warnings),
    )
    return volume.replace(intensity_range=_range(volume))


def _order(chosen: list, warnings: list[str]) -> tuple[list[int], np.ndarray | None, list[str]]:
    geometry = [_geometry(path, ds) for path, ds in chosen]
    instance = [int(ds.get("InstanceNumber") or 0) for _, ds in chosen]
    if any(g is None for g in geometry):
        warnings.append("some slices lack ImagePositionPatient / ImageOrientationPatient: sorted by InstanceNumber")
        return sorted(range(len(chosen)), key=lambda i: instance[i]), None, warnings
    orientation = geometry[0][0]
    for (path, _), (o, _) in zip(chosen, geometry):
        if np.abs(o - orientation).max() > 1e-3:
            raise ImageError(f"{path}: ImageOrientationPatient differs from the other slices of the series")
    normal = np.cross(orientation[:3], orientation[3:])
    distance = np.array([float(p @ normal) for _, p in geometry])
    order = sorted(range(len(chosen)), key=lambda i: (distance[i], instance[i]))
    positions = distance[order]
    warnings += _spacing_warnings(positions, [chosen[i][0] for i in order])
    return order, positions, warnings


def _spacing_warnings(positions: np.ndarray, paths: Sequence[Path]) -> list[str]:
    found = []
    steps = np.diff(positions)
    for i in np.flatnonzero(np.abs(steps) < 1e-3):
        found.append(f"duplicate slice position {positions[i]:.3f} mm: {paths[i]} and {paths[i + 1]}")
    moving = steps[np.abs(steps) >= 1e-3]
    if len(moving):
        typical = float(np.median(moving))
        for i in np.flatnonzero(steps > 1.5 * typical):
            found.append(
                f"gap of {steps[i]:.3f} mm between {paths[i]} and {paths[i + 1]} "
                f"(typical spacing {typical:.3f} mm): slices may be missing"
            )
    return found


def _slice_spacing(positions: np.ndarray | None, ds) -> float:
    if positions is not None and len(positions) > 1:
        steps = np.diff(positions)
        steps = steps[np.abs(steps) >= 1e-3]
        if len(steps):
            return float(np.median(steps))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            return float(ds.get(keyword))
        except (TypeError, ValueError):
            continue
    return float("nan")


def _per_slice(values: list, label: str):
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ImageError(f"{label}: some slices of the series have a rescale and others do not")
    return values[0] if len(set(values)) == 1 else np.asarray(values, dtype=np.float64)


def _range(image: MedicalImage) -> tuple[float, float]:
    values = image.modality_values()
    return float(values.min()), float(values.max())


def sample_indices(n: int, max_slices: int = MAX_SLICES) -> list[int]:
    """The official CT notebook's sampling: all slices when n <= max_slices, else
    `round(i / max_slices * (n - 1))` for i = 1 .. max_slices (Python's round; slice 0 is skipped
    and the last slice is always kept)."""
    if max_slices < 1:
        raise ImageError(f"max_slices must be at least 1, got {max_slices}")
    if n <= max_slices:
        return list(range(n))
    return [int(round(i / max_slices * (n - 1))) for i in range(1, max_slices + 1)]


def sample_slices(volume: MedicalImage, max_slices: int = MAX_SLICES) -> MedicalImage:
    """At most `max_slices` slices, equidistant along the slice axis, as the official notebook.

    The result keeps the whole volume's intensity range (MR min-max covers the whole volume)."""
    if volume.frames == 1 and volume.pixels.ndim == (3 if volume.is_colour else 2):
        raise ImageError(f"{volume.source}: a single 2-D image has no slices to sample")
    keep = sample_indices(volume.frames, max_slices)
    full_range = volume.intensity_range or _range(volume)

    def pick(values):
        if values is None or np.ndim(values) == 0:
            return values
        return np.asarray(values)[keep]

    original = volume.slice_indices or tuple(range(volume.frames))
    return volume.replace(
        pixels=volume.pixels[keep],
        rescale_slope=pick(volume.rescale_slope),
        rescale_intercept=pick(volume.rescale_intercept),
        slice_positions=pick(volume.slice_positions),
        source_files=tuple(volume.source_files[i] for i in keep) if volume.source_files else (),
        slice_indices=tuple(original[i] for i in keep),
        intensity_range=full_range,
    )


def volume_messages(
    volume: MedicalImage,
    instruction: str,
    question: str,
    *,
    preset=None,
    max_slices: int = MAX_SLICES,
) -> list[dict]:
    """Chat content: instruction, then each sampled slice as an RGB image followed by "SLICE n",
    then the question (the MedGemma 1.5 CT / MR prompt layout)."""
    sampled = sample_slices(volume, max_slices)
    rgb = to_rgb(sampled, preset)
    content: list[dict] = [{"type": "text", "text": instruction}]
    for number, image in enumerate(rgb, start=1):
        content.append({"type": "image", "image": image})
        content.append({"type": "text", "text": f"SLICE {number}"})
    content.append({"type": "text", "text": question})
    return content
