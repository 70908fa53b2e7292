"""Header facts of a DICOM data set: rescale, VOI window / LUT, pixel spacing.

Values are looked up at the top level first, then in the functional groups of enhanced
(multi-frame) objects: the shared group, else one item per frame.
"""

from __future__ import annotations

import math

import numpy as np

from openmedgemma.errors import ImageError
from openmedgemma.imaging.image import VOILUT


def _number(value, keyword: str, name: str) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageError(f"{name}: {keyword} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ImageError(f"{name}: {keyword} is {number}, not a finite number")
    return number


def _functional_items(ds, sequence: str) -> list:
    """Items of a functional-group macro: shared first, else one per frame (enhanced objects)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and shared[0][sequence].value:
        return [shared[0][sequence][0]]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    items = [frame[sequence][0] for frame in per_frame if sequence in frame and frame[sequence].value]
    return items


def rescale_of(ds, name: str, frames: int):
    """(slope, intercept), each a float, a per-frame array (enhanced objects) or None if absent."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = _number(ds.RescaleSlope, "RescaleSlope", name) if "RescaleSlope" in ds else None
        intercept = _number(ds.RescaleIntercept, "RescaleIntercept", name) if "RescaleIntercept" in ds else None
        return slope, intercept
    items = _functional_items(ds, "PixelValueTransformationSequence")
    if not items:
        return None, None
    slopes = [_number(i.RescaleSlope, "RescaleSlope", name) if "RescaleSlope" in i else None for i in items]
    intercepts = [
        _number(i.RescaleIntercept, "RescaleIntercept", name) if "RescaleIntercept" in i else None for i in items
    ]
    if any(s is None for s in slopes) or any(c is None for c in intercepts):
        missing = "RescaleSlope" if any(s is None for s in slopes) else "RescaleIntercept"
        raise ImageError(f"{name}: Pixel Value Transformation lacks {missing} for some frames")
    if len(items) == 1 or (len(set(slopes)) == 1 and len(set(intercepts)) == 1):
        return slopes[0], intercepts[0]
    if len(items) != frames:
        raise ImageError(f"{name}: {len(items)} per-frame rescale values for {frames} frames")
    return np.asarray(slopes), np.asarray(intercepts)


def require_ct_rescale(name: str, slope, intercept) -> None:
    if slope is None and intercept is None:
        raise ImageError(
            f"{name}: CT without RescaleSlope and RescaleIntercept: Hounsfield units cannot be "
            "computed (stored values may or may not carry a +1024 offset), so the CT windows would "
            "be guessed; fix the header (both are Type 1 for CT) before use"
        )
    if slope is None or intercept is None:
        missing = "RescaleSlope" if slope is None else "RescaleIntercept"
        present = "RescaleIntercept" if slope is None else "RescaleSlope"
        raise ImageError(
            f"{name}: CT has {present} but no {missing}: Hounsfield units cannot be computed"
        )


def window_of(ds, name: str) -> tuple[float | None, float | None, str]:
    """First (center, width, VOI LUT function) of the file, or (None, None, "LINEAR")."""
    holder = ds
    if "WindowCenter" not in ds:
        items = _functional_items(ds, "FrameVOILUTSequence")
        holder = items[0] if items else ds
    if "WindowCenter" not in holder or "WindowWidth" not in holder:
        return None, None, "LINEAR"
    center = _number(holder.WindowCenter, "WindowCenter", name)
    width = _number(holder.WindowWidth, "WindowWidth", name)
    function = str(holder.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ImageError(f"{name}: unknown VOILUTFunction {function!r}")
    if not (width >= 1 if function == "LINEAR" else width > 0):
        raise ImageError(f"{name}: WindowWidth {width:g} is invalid for a {function} window")
    return center, width, function


def voi_lut_of(ds, name: str) -> VOILUT | None:
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except Exception:
        raise ImageError(f"{name}: malformed VOI LUT Descriptor") from None
    entries = entries or 65536
    if bits not in (8, *range(10, 17)):
        raise ImageError(f"{name}: VOI LUT with {bits} bits per entry is not valid (8 or 10-16)")
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
    return VOILUT(first_mapped=first, table=np.asarray(table), bits=bits)


def spacing_of(ds, name: str) -> tuple[float, float] | None:
    holder = ds if "PixelSpacing" in ds else None
    if holder is None:
        items = _functional_items(ds, "PixelMeasuresSequence")
        holder = items[0] if items and "PixelSpacing" in items[0] else None
    keyword = "PixelSpacing"
    if holder is None and "ImagerPixelSpacing" in ds:
        holder, keyword = ds, "ImagerPixelSpacing"
    if holder is None:
        return None
    values = list(holder[keyword].value) if holder[keyword].VM > 1 else [holder[keyword].value]
    if len(values) != 2:
        raise ImageError(f"{name}: {keyword} must have 2 values, has {len(values)}")
    return tuple(_number(v, keyword, name) for v in values)
