"""Weights that decode streams every token, placed in memory the kernel backs with 2 MB pages.

A decode step reads each weight once, from DRAM. On 4 KB pages one core streams far fewer bytes per second than
on 2 MB pages (the hardware prefetchers stop at every page boundary, and every page costs a TLB entry): on an
EPYC Zen 4, 1 thread, a sum over 256 MB ran at 18.6 GB/s against 28.2, and the 130M int8 decode step's matmuls
at 19 against 27 GB/s (benchmarks/RESULTS.md). torch's allocator gets huge pages only where the system's
transparent huge page mode is "always"; the common default is "madvise", which grants them to memory that asks.

Inside `with arena():` (the engine's `quantize` and `quantized_head`), `empty` carves the new weights one after
another out of private anonymous regions advised (`MADV_HUGEPAGE`) before their first write, in the order they
are made (a model's layers in order). Each tensor has its own storage (`state_dict`, `torch.save` and safetensors
see ordinary, unshared tensors) and a region is unmapped when the last tensor in it is freed. Outside an arena,
and off Linux, `empty` is `torch.empty`. Advice only: with the mode "never", or where the kernel has no free huge
page, the memory is ordinary and nothing else changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
REGION = 64 << 20  # mapped at a time (virtual: pages that are never written cost nothing)


@functools.cache
def mode() -> str:
    """The system's transparent huge page mode ("always", "madvise", "never"), "" where there is none (read once:
    `empty` asks for every weight)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="ascii")
    except OSError:
        return ""
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else ""


def supported() -> bool:
    """Linux with transparent huge pages built in (the advice is taken in any mode; "never" ignores it)."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and mode() != ""


class Arena:
    """Consecutive tensors out of huge-page-advised regions (one region per REGION bytes; a larger tensor gets
    a region of its own)."""

    def __init__(self):
        self.region: memoryview | None = None
        self.offset = self.end = 0

    @staticmethod
    def _map(nbytes: int) -> tuple[memoryview, int]:
        """A new region for `nbytes`, and the offset of its first 2 MB boundary (from where pages can be huge)."""
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
        return memoryview(region), start

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if nbytes > REGION // 2:  # its own region; the current one keeps serving the small ones
            region, offset = self._map(nbytes)
        else:
            if self.region is None or self.offset + nbytes > self.end:
                self.region, self.offset = self._map(REGION)
                self.end = self.offset + REGION
            region, offset = self.region, self.offset
            self.offset += -(-nbytes // ALIGN) * ALIGN
        return torch.frombuffer(region[offset : offset + nbytes], dtype=dtype).view(shape)


_ACTIVE: list[Arena] = []


@contextlib.contextmanager
def arena() -> Iterator[Arena]:
    """Within it, `empty` places tensors in huge-page-advised memory (where `supported()`)."""
    _ACTIVE.append(Arena())
    try:
        yield _ACTIVE[-1]
    finally:
        _ACTIVE.pop()  # the regions now live as long as their tensors


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a weight decode streams: from the active arena, else `torch.empty`."""
    if _ACTIVE and supported():
        return _ACTIVE[-1].empty(tuple(shape), dtype)
    return torch.empty(tuple(shape), dtype=dtype)


def trim() -> None:
    """Give the free pages of malloc's heap back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Quantizing makes large temporaries (a layer's weight in fp32, its int8 rows) that glibc, once it has freed one
    such block, serves from its heap instead of fresh mappings, and does not give back: without this a model's
    quantization left them resident (8 layers of 8 MB: +70 MB)."""
    if _libc() is not None:
        _libc().malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def _mappings() -> list[tuple[int, int, bool, int]]:
    """(start, end, advised for huge pages, bytes on huge pages) of every mapping of this process (/proc/self/smaps)."""
    found: list[list] = []
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                    found.append([*(int(v, 16) for v in head.split("-")), False, 0])
                elif head == "AnonHugePages:" and found:
                    found[-1][3] = int(line.split()[1]) * 1024
                elif head == "VmFlags:" and found:
                    found[-1][2] = "hg" in line.split()[1:]
    except (OSError, ValueError):
        return []
    return [tuple(m) for m in found]


def backing(tensor: torch.Tensor) -> tuple[bool, int, int]:
    """(advised, bytes on huge pages, bytes mapped) of the mapping that holds `tensor`; (False, 0, 0) where that
    cannot be read."""
    address = tensor.data_ptr()
    for start, end, advised, huge in _mappings():
        if start <= address < end:
            return advised, huge, end - start
    return False, 0, 0


def describe(tensors) -> str:
    """For the engine's notice: how much of the weights `tensors` lies on huge pages (the AnonHugePages of the
    advised mappings that hold them, against their bytes)."""
    tensors = list({t.data_ptr(): t for t in tensors}.values())
    advised = [m for m in _mappings() if m[2] and any(m[0] <= t.data_ptr() < m[1] for t in tensors)]
    setting = f" (transparent huge pages: {mode()})" if mode() else ""
    if not advised:
        return "weights on 4 KB pages" + setting
    huge, weights = sum(m[3] for m in advised), sum(t.nbytes for t in tensors)
    return f"weights on 2 MB pages: {min(huge, weights) / 2**20:.0f} of {weights / 2**20:.0f} MB{setting}"
