"""Streamed weights in huge-page-advised memory (engine/hugepages.py): same values, own storages, freed with them."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from openmedgemma.engine import hugepages, quantize
from openmedgemma.engine.quant import QUANTIZED, quantized_head

needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages on this system")


class Holder(nn.Module):
    def __init__(self, *tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"b{i}", t)


def _holders():
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(-127, 128, (1100, 1000), dtype=torch.int8, generator=gen)  # over MIN_BYTES
    return [Holder(big, torch.rand(1100, generator=gen)),
            Holder(torch.randn(33, 65, generator=gen).half(), torch.randn(5, 3, generator=gen).t())]  # fmt: skip


def _mapped(address: int) -> bool:
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


@needs_thp
def test_gather_moves_buffers_in_order_into_one_advised_region_with_the_same_values():
    holders = _holders()
    before = [copy.deepcopy(dict(h.named_buffers())) for h in holders]
    moved = hugepages.gather(holders)
    assert moved >= 1100 * 1000
    tensors = [t for h in holders for t in h.buffers()]
    for h, want in zip(holders, before):
        for name, t in h.named_buffers():
            assert torch.equal(t, want[name]) and t.dtype == want[name].dtype and t.is_contiguous()
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own storage, nothing shared
    addresses = [t.data_ptr() for t in tensors]
    assert addresses == sorted(addresses) and all(a % hugepages.ALIGN == 0 for a in addresses)
    assert addresses[0] % hugepages.HUGE_PAGE == 0  # the region's first 2 MB boundary
    advised, _, size = hugepages.backing(tensors[0])
    assert advised and size >= moved and addresses[-1] < addresses[0] + size
    assert hugepages.backing(tensors[-1])[0]  # the same region


@needs_thp
def test_gathered_buffers_save_and_load_as_ordinary_tensors(tmp_path):
    holders = _holders()
    hugepages.gather(holders)
    state = {f"{i}.{k}": v for i, h in enumerate(holders) for k, v in h.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")  # refuses tensors that share memory
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "w.pt")
    weights = sum(v.numel() * v.element_size() for v in state.values())
    assert (tmp_path / "w.pt").stat().st_size < weights + (64 << 10)  # each tensor's bytes, not the region's


@needs_thp
def test_the_region_is_unmapped_when_its_last_tensor_is_freed():
    holders = _holders()
    hugepages.gather(holders)
    address = holders[0].b0.data_ptr()
    last = holders[1].b1
    del holders
    gc.collect()
    assert _mapped(address)  # one tensor still holds it
    del last
    gc.collect()
    assert not _mapped(address)


def test_nothing_moves_without_huge_pages_or_for_a_few_bytes(monkeypatch):
    small = Holder(torch.ones(100))
    assert hugepages.gather([small]) == 0 and small.b0.untyped_storage().nbytes() == 400
    holders = _holders()
    ptrs = [t.data_ptr() for h in holders for t in h.buffers()]
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    assert hugepages.gather(holders) == 0
    assert [t.data_ptr() for h in holders for t in h.buffers()] == ptrs


@needs_thp
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_quantized_weights_are_gathered_and_compute_the_same(ours_text, mode, monkeypatch):
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny test model's weights are a few hundred KB
    outs = []
    for gather in (True, False):
        model = copy.deepcopy(ours_text)
        if not gather:
            monkeypatch.setattr(hugepages, "supported", lambda: False)
        quantize(model, mode)
        head = quantized_head(model, mode)
        layers = [m for m in model.language_model.layers.modules() if isinstance(m, QUANTIZED)]
        if gather:  # (not asserted the other way: numpy advises huge pages in the heap, where malloc may reuse them)
            assert hugepages.backing(next(layers[0].buffers()))[0] and hugepages.backing(next(head.buffers()))[0]
        with torch.no_grad():
            for step in (ids, ids[:, :1]):  # prefill and a decode-sized input
                outs.append(head(model.hidden_states(step)))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@needs_thp
def test_gather_holds_one_extra_tensor_at_a_time_not_a_second_copy():
    """Peak memory (a fresh process's VmHWM, reset just before): 8 buffers of 8 MB gathered cost at most one more
    buffer's worth."""
    code = """
import sys, torch
from torch import nn
from openmedgemma.engine import hugepages

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

holder = nn.Module()
for i in range(8):
    holder.register_buffer(f"b{i}", torch.full((8 << 20,), i, dtype=torch.uint8))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
assert hugepages.gather([holder]) == 64 << 20
assert all(int(t[0]) == i for i, t in enumerate(holder.buffers()))
print(status("VmHWM") - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    rise = int(out.stdout.split()[-1])
    assert rise <= (8 + 4) << 20, rise  # one buffer, plus the region's partly used last huge page
