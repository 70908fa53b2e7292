"""Zip archives of DICOM files, read in memory with caps: never extracted to disk.

Member names are labels only (they name a slice in messages); they never reach the file system,
so a member called `../../etc/passwd` is as harmless as `IM0001`. The caps bound what a hostile
archive (a zip bomb, a million empty members) can cost before anything is decompressed: they are
checked on the declared sizes, which cannot lie, since `zipfile` reads no byte past a member's
declared size and then checks its CRC.
"""

from __future__ import annotations

import io
import zipfile

from openmedgemma.errors import ImageError

MAX_MEMBERS = 2048  # a CT series is rarely over 1000 slices
MAX_BYTES = 1 << 30  # uncompressed bytes of all members together

ZIP_MAGIC = b"PK\x03\x04"


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC)


def read_zip(data: bytes, *, label: str = "<zip>", max_members: int = MAX_MEMBERS,
             max_bytes: int = MAX_BYTES) -> list[tuple[str, bytes]]:  # fmt: skip
    """(member name, bytes) of every file in the archive, in archive order.

    Folders, macOS resource forks (`__MACOSX/`, `._x`) and hidden files are left out. ImageError
    for a corrupt or encrypted archive, more than `max_members` files, or more than `max_bytes`
    uncompressed bytes in all.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [info for info in archive.infolist() if _wanted(info)]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ImageError(f"{label}: not a readable zip archive ({err})") from None
    if len(infos) > max_members:
        raise ImageError(f"{label}: {len(infos)} files in the archive, more than the limit of {max_members}")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise ImageError(f"{label}: {declared} uncompressed bytes, more than the limit of {max_bytes}")
    members = []
    for info in infos:
        if info.flag_bits & 0x1:
            raise ImageError(f"{label}: member {info.filename!r} is encrypted")
        try:
            members.append((info.filename, archive.read(info)))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
            raise ImageError(f"{label}: member {info.filename!r} cannot be read ({err})") from None
    if not members:
        raise ImageError(f"{label}: the zip archive holds no files")
    return members


def _wanted(info: zipfile.ZipInfo) -> bool:
    name = info.filename
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return not (info.is_dir() or name.startswith("__MACOSX/") or base.startswith("."))
