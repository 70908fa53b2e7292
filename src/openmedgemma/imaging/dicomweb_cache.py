"""A bounded on-disk cache of DICOM instances retrieved over DICOMweb. Off unless a folder is given.

Privacy: the cached files are the instances as the PACS sent them, with every identifying attribute
(names, IDs, dates) in clear. The folder is created readable by its owner only (0700, files 0600),
it is never cleaned up by itself except to stay under `max_bytes` (least recently used files go
first), and deleting it is the way to forget. File names are hashes: they do not reveal the UIDs.
Put it only where the hospital allows patient data to rest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from openmedgemma.errors import PacsError

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB


class InstanceCache:
    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 1:
            raise PacsError(f"{folder}: cache size must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise PacsError(f"{self.folder}: cannot create the DICOMweb cache folder ({err.strerror or err})") from None
        if not self.folder.is_dir():
            raise PacsError(f"{self.folder}: the DICOMweb cache is not a folder")
        self._total = self.size()  # kept up to date by put, so eviction scans the folder only when over

    def _path(self, url: str, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        key = "\n".join((url, study_uid, series_uid, sop_uid)).encode()
        return self.folder / (hashlib.sha256(key).hexdigest() + ".dcm")

    def get(self, url: str, study_uid: str, series_uid: str, sop_uid: str) -> bytes | None:
        path = self._path(url, study_uid, series_uid, sop_uid)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: evicted last
            return data
        except OSError:
            return None

    def put(self, url: str, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(url, study_uid, series_uid, sop_uid)
        temporary = path.with_suffix(".part")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)  # readers never see half a file
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise PacsError(f"{self.folder}: cannot write to the DICOMweb cache ({err.strerror or err})") from None
        self._total += len(data)
        if self._total > self.max_bytes:
            self._evict()

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.folder.glob("*.dcm"))

    def _evict(self) -> None:
        files = []
        for path in self.folder.glob("*.dcm"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):  # oldest use first
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._total = total
