"""Imaging benchmark: DICOM -> model-ready tensors, against a plain pydicom + transformers reference.

    python benchmarks/imaging.py [--repeats N]

1. The 128-slice PACSMAN series (shared/data) -> 85 tensors [85, 3, 896, 896]:
   load_series -> sample_slices -> to_rgb -> to_pixel_values.
2. One 512x512 CT slice (synthesised in a temporary folder from CT_small's header, pixels
   upsampled 4x) -> one tensor [1, 3, 896, 896]: load_image -> to_rgb -> to_pixel_values.
The reference does the same work the way the official notebooks do (pydicom.dcmread, apply
rescale, numpy windowing / min-max, zero padding, transformers' Gemma3ImageProcessor(Pil) with
the Hub settings); both outputs are checked equal before timing. Medians over --repeats runs,
torch.set_num_threads(2).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from openmedgemma.imaging import load_image, load_series, pad_to_square, sample_slices, to_pixel_values, to_rgb

REPO = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path | None:
    """$OPENMEDGEMMA_DATA, else ../shared/data beside the repository (as tests/conftest.py)."""
    for path in filter(None, [os.environ.get("OPENMEDGEMMA_DATA"), REPO.parent / "shared" / "data"]):
        if (Path(path) / "README.md").is_file():
            return Path(path)
    return None


def hub_processor(size: int = 896):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, resample=2, rescale_factor=1 / 255,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True, do_pan_and_scan=False,
    )


def ours_series(folder: Path) -> torch.Tensor:
    return to_pixel_values(to_rgb(sample_slices(load_series(folder))), size=896)


def reference_series(folder: Path, processor) -> torch.Tensor:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial, normal = +z here
    n = len(datasets)
    picked = [datasets[int(round(i / 85 * (n - 1)))] for i in range(1, 86)] if n > 85 else datasets
    volume_min = min(float(pydicom.pixels.apply_rescale(ds.pixel_array, ds).min()) for ds in datasets)
    volume_max = max(float(pydicom.pixels.apply_rescale(ds.pixel_array, ds).max()) for ds in datasets)
    images = []
    for ds in picked:
        values = pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype(np.float64)
        gray = np.round((values - volume_min) / (volume_max - volume_min) * 255).astype(np.uint8)
        images.append(pad_to_square(np.repeat(gray[..., None], 3, axis=-1)))
    return processor(images, return_tensors="pt")["pixel_values"]


def ours_slice(path: Path) -> torch.Tensor:
    return to_pixel_values([to_rgb(load_image(path))], size=896)


def reference_slice(path: Path, processor) -> torch.Tensor:
    ds = pydicom.dcmread(path)
    hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
    channels = []
    for low, high in [(-1024, 1024), (-135, 215), (0, 80)]:  # the official notebook's norm()
        x = np.clip(hu, low, high).astype(np.float32)
        x -= low
        x /= high - low
        x *= 255.0
        channels.append(x)
    rgb = np.round(np.stack(channels, axis=-1), 0).astype(np.uint8)
    return processor([pad_to_square(rgb)], return_tensors="pt")["pixel_values"]


def synthesise_512_ct(ct_small: Path, folder: Path) -> Path:
    ds = pydicom.dcmread(ct_small)
    pixels = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.PixelSpacing = [v / 4 for v in ds.PixelSpacing]
    path = folder / "ct512.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = find_shared_data()
    if data is None:
        print("shared data not found: set $OPENMEDGEMMA_DATA", file=sys.stderr)
        return 2
    series = data / "dicom" / "pacsman_synthetic" / "dicomseries"
    processor = hub_processor()
    with tempfile.TemporaryDirectory() as tmp:
        ct512 = synthesise_512_ct(data / "dicom" / "pydicom_test_files" / "CT_small.dcm", Path(tmp))
        assert torch.equal(ours_series(series), reference_series(series, processor))
        assert torch.equal(ours_slice(ct512), reference_slice(ct512, processor))
        figures = {
            "series 128 -> 85 x [3, 896, 896]": (
                median_seconds(lambda: ours_series(series), args.repeats),
                median_seconds(lambda: reference_series(series, processor), args.repeats),
            ),
            "CT slice 512x512 -> 1 x [3, 896, 896]": (
                median_seconds(lambda: ours_slice(ct512), args.repeats * 4),
                median_seconds(lambda: reference_slice(ct512, processor), args.repeats * 4),
            ),
        }
    print(f"machine: {cpu_name()}, torch threads {torch.get_num_threads()}, python {platform.python_version()}")
    for name, (ours, reference) in figures.items():
        print(f"{name}: openmedgemma {ours * 1000:.1f} ms, reference {reference * 1000:.1f} ms, ratio {ours / reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
