"""Fuzz: mutated real DICOM files either load into a sane image or raise ImageError, nothing else.

3 x 1000 derandomized hypothesis examples (reproducible); together well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openmedgemma.errors import ImageError
from openmedgemma.imaging import load_image, to_rgb

FUZZ = settings(
    max_examples=1000, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Originals(list):
    def __repr__(self) -> str:  # keep hypothesis' falsifying-example report short
        return f"<{len(self)} real DICOM files>"


@pytest.fixture(scope="module")
def originals(dicom_dir) -> list[bytes]:
    tests = dicom_dir / "pydicom_test_files"
    cr = next(p for p in (tests / "dicomdirtests" / "77654033" / "CR1").iterdir())
    files = [tests / "CT_small.dcm", tests / "MR_small.dcm", dicom_dir / "pacsman_synthetic" / "dicomseries" / "slice64.dcm", cr]
    return Originals(f.read_bytes() for f in files)


def check(data: bytes) -> None:
    try:
        image = load_image(data)
    except ImageError as err:
        assert str(err).startswith("<bytes>: ") and "\n" not in str(err)
        return
    pixels = image.pixels
    assert isinstance(pixels, np.ndarray) and pixels.size > 0 and pixels.dtype.kind in "iuf"
    assert pixels.ndim in (2, 3, 4) and all(n > 0 for n in pixels.shape)
    if pixels.dtype.kind == "f":
        assert np.isfinite(pixels).all()
    try:
        rgb = to_rgb(image)
    except ImageError as err:
        assert str(err).startswith("<bytes>")
        return
    spatial = pixels.shape[:-1] if image.is_colour else pixels.shape
    assert rgb.dtype == np.uint8 and rgb.shape == spatial + (3,)


@FUZZ
@given(data=st.data())
def test_byte_mutations(originals, data):
    source = bytearray(originals[data.draw(st.integers(0, len(originals) - 1), label="file")])
    header_bias = data.draw(st.booleans(), label="header")
    limit = min(len(source), 1600) if header_bias else len(source)
    edits = data.draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for offset, value in edits:
        source[offset] = value
    check(bytes(source))


@FUZZ
@given(data=st.data())
def test_truncation(originals, data):
    source = originals[data.draw(st.integers(0, len(originals) - 1), label="file")]
    check(source[: data.draw(st.integers(0, len(source) - 1), label="length")])


@FUZZ
@given(data=st.data())
def test_insertions_and_deletions(originals, data):
    source = originals[data.draw(st.integers(0, len(originals) - 1), label="file")]
    start = data.draw(st.integers(0, min(len(source), 2000)), label="start")
    removed = data.draw(st.integers(0, 64), label="removed")
    inserted = data.draw(st.binary(max_size=64), label="inserted")
    check(source[:start] + inserted + source[start + removed:])
