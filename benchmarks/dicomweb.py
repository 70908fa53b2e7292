"""DICOMweb benchmark: a study UID on a real Orthanc over loopback -> model-ready tensors, against the same files read locally.

    python benchmarks/dicomweb.py [--repeats N]

Starts Debian's Orthanc with its DICOMweb plugin on 127.0.0.1 (a free port, a temporary storage folder),
uploads the 128-slice PACSMAN series, then times, alternating local and remote runs (medians):
1. to the volume: `load_series(folder)` against `load_study(store, study_uid)` (QIDO-RS for the series,
   WADO-RS for the 128 instances, then the same `load_series` on the bytes);
2. to tensors [85, 3, 896, 896]: the above, then `sample_slices` -> `to_rgb` -> `to_pixel_values`;
3. the same from the opt-in local cache (QIDO-RS only over the network).
Bytes transferred are counted by the client (HTTP bodies, after any decompression) against the files'
bytes on disk. Outputs are asserted identical before timing. torch.set_num_threads(2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from benchmarks.imaging import cpu_name, find_shared_data  # noqa: E402
from openmedgemma.imaging import load_series, sample_slices, to_pixel_values, to_rgb  # noqa: E402
from openmedgemma.imaging.dicomweb import DicomWebSource  # noqa: E402
from openmedgemma.imaging.dicomweb_cache import InstanceCache  # noqa: E402
from openmedgemma.imaging.pacs import load_study  # noqa: E402
from tests.orthanc import PASSWORD, USER, Orthanc, missing_reason  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.23904356067352728123256330845974725175"


def tensors(volume) -> torch.Tensor:
    return to_pixel_values(to_rgb(sample_slices(volume)), size=896)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data, reason = find_shared_data(), missing_reason()
    if data is None or reason:
        print(reason or "shared data not found: set $OPENMEDGEMMA_DATA", file=sys.stderr)
        return 2
    folder = data / "dicom" / "pacsman_synthetic" / "dicomseries"
    files = sorted(folder.glob("*.dcm"))
    on_disk = sum(p.stat().st_size for p in files)
    with tempfile.TemporaryDirectory() as tmp, Orthanc(Path(tmp) / "orthanc") as pacs:
        pacs.upload(files)

        def remote(cache=None) -> DicomWebSource:
            return DicomWebSource(pacs.dicomweb_url, username=USER, password=PASSWORD, cache=cache)

        cache = InstanceCache(Path(tmp) / "cache")
        first = remote(cache)
        assert torch.equal(tensors(load_study(first, STUDY).volume), tensors(load_series(folder)))  # fills the cache
        runs: dict[str, list[float]] = {k: [] for k in ("local volume", "remote volume", "cached volume",
                                                        "local tensors", "remote tensors")}  # fmt: skip
        received = []
        for _ in range(args.repeats):
            runs["local volume"].append(timed(lambda: load_series(folder))[0])
            store = remote()
            runs["remote volume"].append(timed(lambda: load_study(store, STUDY))[0])
            received.append((store.bytes_received, store.requests_made))
            cached_store = remote(cache)
            runs["cached volume"].append(timed(lambda: load_study(cached_store, STUDY))[0])
            runs["local tensors"].append(timed(lambda: tensors(load_series(folder)))[0])
            runs["remote tensors"].append(timed(lambda: tensors(load_study(remote(), STUDY).volume))[0])
        cached_bytes = cached_store.bytes_received
    median = {name: statistics.median(times) for name, times in runs.items()}
    print(f"machine: {cpu_name()}, torch threads {torch.get_num_threads()}, Orthanc on 127.0.0.1, "
          f"{args.repeats} alternating runs (medians)")  # fmt: skip
    print(f"128-slice series -> volume: local {median['local volume'] * 1000:.0f} ms, DICOMweb "
          f"{median['remote volume'] * 1000:.0f} ms (ratio {median['remote volume'] / median['local volume']:.2f}), "
          f"cached {median['cached volume'] * 1000:.0f} ms (ratio {median['cached volume'] / median['local volume']:.2f})")
    print(f"128-slice series -> 85 x [3, 896, 896]: local {median['local tensors'] * 1000:.0f} ms, DICOMweb "
          f"{median['remote tensors'] * 1000:.0f} ms (ratio {median['remote tensors'] / median['local tensors']:.2f})")
    body, requests_made = received[-1]
    print(f"bytes: {body:,} received in {requests_made} requests for {on_disk:,} bytes of files "
          f"({body / on_disk:.3f}x); from the cache {cached_bytes:,} (QIDO only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
