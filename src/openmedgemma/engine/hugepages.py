"""Weights that decode streams every token, moved into memory the kernel backs with 2 MB pages.

A decode step reads each weight once, from DRAM. On 4 KB pages one core streams far fewer bytes per second than
on 2 MB pages (the hardware prefetchers stop at every page boundary, and every page costs a TLB entry): on an
EPYC Zen 4, 1 thread, a sum over 256 MB ran at 17 GB/s against 28, and the 130M int8 decode step's matmuls at 19
against 27 GB/s (benchmarks/RESULTS.md). torch's allocator gets huge pages only where the system's transparent
huge page mode is "always"; the common default is "madvise", which grants them to memory that asks.

`gather` asks: it maps one private anonymous region, advises it (`MADV_HUGEPAGE`) before the first write, copies
the given modules' CPU buffers into it in order and puts the copies in their place. Each copy is its own tensor
(own storage: `state_dict`, `torch.save` and safetensors see ordinary, unshared tensors), and the region is
unmapped when the last of them is freed. Advice only: off Linux, with the mode "never", or where the kernel has
no free huge page, the memory is ordinary and nothing else changes.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 1 << 20  # below this, a model's streamed weights are too few to matter


def mode() -> str:
    """The system's transparent huge page mode ("always", "madvise", "never"), "" where there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="ascii")
    except OSError:
        return ""
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else ""


def supported() -> bool:
    """Linux with transparent huge pages built in (the advice is taken in any mode; "never" ignores it)."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and mode() != ""


def gather(modules: Iterable[nn.Module]) -> int:
    """Move the CPU buffers of `modules` into one huge-page-advised region, in order; the bytes moved (0 if not)."""
    places = [(m, name) for m in modules for name, t in m._buffers.items()
              if t is not None and t.device.type == "cpu" and t.numel() > 0]  # fmt: skip
    sizes = [-(-m._buffers[name].nbytes // ALIGN) * ALIGN for m, name in places]
    total = sum(sizes)
    if total < MIN_BYTES or not supported():
        return 0
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe = torch.frombuffer(region, dtype=torch.uint8, count=1)
    start = -probe.data_ptr() % HUGE_PAGE  # the first 2 MB boundary: the pages from there on can be huge
    del probe
    region.madvise(mmap.MADV_HUGEPAGE, start, total)
    whole = memoryview(region)
    offset = start
    with torch.no_grad():
        for (module, name), size in zip(places, sizes):
            old = module._buffers[name]
            new = torch.frombuffer(whole[offset : offset + old.nbytes], dtype=old.dtype).view(old.shape)
            module._buffers[name] = new.copy_(old)  # the old one is freed here: one at a time, not a second model
            offset += size
    return total


def backing(tensor: torch.Tensor) -> tuple[bool, int, int]:
    """(advised, bytes on huge pages, bytes mapped) of the mapping that holds `tensor`, from /proc/self/smaps;
    (False, 0, 0) where that cannot be read."""
    address, inside, found = tensor.data_ptr(), False, {}
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                    if found:
                        break
                    start, end = (int(v, 16) for v in head.split("-"))
                    inside = start <= address < end
                    if inside:
                        found["size"] = end - start
                elif inside and head == "AnonHugePages:":
                    found["huge"] = int(line.split()[1]) * 1024
                elif inside and head == "VmFlags:":
                    found["advised"] = "hg" in line.split()[1:]
    except (OSError, ValueError):
        return False, 0, 0
    return found.get("advised", False), found.get("huge", 0), found.get("size", 0)


def describe(tensor: torch.Tensor) -> str:
    """For the engine's notice: how the weights that hold `tensor` are paged."""
    advised, huge, size = backing(tensor)
    if not advised:
        return "weights on 4 KB pages" + (f" (transparent huge pages: {mode()})" if mode() else "")
    return f"weights on 2 MB pages: {huge / 2**20:.0f} of {size / 2**20:.0f} MB (transparent huge pages: {mode()})"
