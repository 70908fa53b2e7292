"""Streamed weights made in huge-page-advised memory (engine/hugepages.py): in order, own storages, freed with them."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from openmedgemma.engine import hugepages, native, quantize
from openmedgemma.engine.quant import QUANTIZED, quantized_head

needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages on this system")


def _mapping(address: int) -> tuple[int, int] | None:
    """(start, end) of the mapping of this process that holds `address`."""
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start <= address < end:
                return start, end
    return None


def _made(arena_on: bool) -> list[torch.Tensor]:
    shapes = [((1000, 300), torch.int8), ((33, 65), torch.float16), ((7,), torch.float32), ((40 << 20,), torch.uint8)]
    if arena_on:
        with hugepages.arena():
            return [hugepages.empty(s, d) for s, d in shapes]
    return [hugepages.empty(s, d) for s, d in shapes]


@needs_thp
def test_arena_places_tensors_in_order_in_advised_regions_each_with_its_own_storage():
    tensors = _made(arena_on=True)
    assert [t.shape for t in tensors] == [(1000, 300), (33, 65), (7,), (40 << 20,)]
    small = [t.data_ptr() for t in tensors[:3]]
    assert small == sorted(small) and all(a % hugepages.ALIGN == 0 for a in small)
    assert small[0] % hugepages.HUGE_PAGE == 0  # the region's first 2 MB boundary
    assert small[2] - small[0] < 1 << 20  # one after another
    for t in tensors:
        assert hugepages.backing(t)[0], t.shape  # advised (VmFlags "hg")
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own storage, nothing shared
    assert _mapping(tensors[3].data_ptr()) != _mapping(tensors[0].data_ptr())  # over half a region: its own


def test_outside_an_arena_empty_is_torch_empty(monkeypatch):
    for t in _made(arena_on=False):
        assert not hugepages.backing(t)[0] or t.numel() < (1 << 20)  # (small ones may share numpy-advised heap)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    with hugepages.arena():
        big = hugepages.empty((40 << 20,), torch.uint8)
    assert not hugepages.backing(big)[0]
    assert hugepages.describe([big]).startswith("weights on 4 KB pages")


@needs_thp
def test_arena_tensors_save_and_load_as_ordinary_tensors(tmp_path):
    with hugepages.arena():
        state = {"q": native.pack_blocks(torch.randint(-127, 128, (70, 48), dtype=torch.int8)),
                 "s": hugepages.empty((70,), torch.float32).fill_(0.5)}  # fmt: skip
    assert all(hugepages.backing(v)[0] for v in state.values())
    save_file(state, tmp_path / "w.safetensors")  # refuses tensors that share memory
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "w.pt")
    weights = sum(v.numel() * v.element_size() for v in state.values())
    assert (tmp_path / "w.pt").stat().st_size < weights + (64 << 10)  # each tensor's bytes, not its region's


@needs_thp
def test_a_region_is_unmapped_when_its_last_tensor_is_freed():
    tensors = _made(arena_on=True)
    address, last = tensors[0].data_ptr(), tensors[2]
    del tensors
    gc.collect()
    assert _mapping(address)  # one tensor still holds it
    del last
    gc.collect()
    assert _mapping(address) is None


@needs_thp
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_leaves_only_the_quantized_weights_resident(mode):
    """A fresh process quantizes a random decoder (~360 MB of fp32 linear weights, held throughout): its RSS
    afterwards rises by no more than the quantized weights (which `quantize` makes in the arena) plus a few MB.
    Without `hugepages.trim()` after each layer the temporaries stayed in malloc's heap (int8: +306 MB against
    +95). The peak (VmHWM, reset before; shown on failure) is the temporaries of a layer or two on top: 1.1-2.7
    layers of fp32 weights, as malloc holds them until the layer's trim."""
    code = """
import sys, torch
from openmedgemma.config import GemmaTextConfig, MedGemmaConfig
from openmedgemma.engine import hugepages, quantize
from openmedgemma.model.medgemma import MedGemma

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

cfg = GemmaTextConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128)
model = MedGemma(MedGemmaConfig(text=cfg, vision=None))
from openmedgemma.engine import native
assert native.int8_gemv_available()  # the kernels' library loaded (its pages are not what is measured)
layer = sum(p.nbytes for p in model.language_model.layers[0].parameters())  # one layer's fp32 weights
held = list(model.language_model.layers.parameters())  # resident throughout: the rise is only what quantize adds
model.language_model.layers.requires_grad_(False)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
quantize(model, sys.argv[1])
kept = sum(b.nbytes for b in model.language_model.layers.buffers())
print(status("VmHWM") - before, status("VmRSS") - before, kept, layer)
"""
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300, check=True)
    peak, end, kept, layer = (int(v) for v in out.stdout.split()[-4:])
    assert end <= kept + (8 << 20), (end, kept, peak, layer)


@needs_thp
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_quantized_weights_are_on_advised_pages_and_compute_the_same(ours_text, mode, monkeypatch):
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for arena in (True, False):
        model = copy.deepcopy(ours_text)
        if not arena:
            monkeypatch.setattr(hugepages, "supported", lambda: False)
        quantize(model, mode)
        head = quantized_head(model, mode)
        layers = [m for m in model.language_model.layers.modules() if isinstance(m, QUANTIZED)]
        if arena:  # (not asserted the other way: numpy advises huge pages in the heap, where malloc may reuse them)
            assert hugepages.backing(next(layers[0].buffers()))[0] and hugepages.backing(next(head.buffers()))[0]
            addresses = [next(m.buffers()).data_ptr() for m in layers]
            assert addresses == sorted(addresses)  # made in layer order, one after another
            notice = hugepages.describe(list(model.language_model.layers.buffers()))  # the engine's notice says so
            assert notice.startswith("weights on 2 MB pages: ") and f"huge pages: {hugepages.mode()})" in notice
        with torch.no_grad():
            for step in (ids, ids[:, :1]):  # prefill and a decode-sized input
                outs.append(head(model.hidden_states(step)))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
