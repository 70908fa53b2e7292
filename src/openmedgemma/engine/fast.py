"""The engine's speed options around the decoder's own forward (`model/gemma3.py`: the only forward).

A decode step of a small model costs what its matmuls stream and its ops cost to dispatch. The model's
forward already takes the cheap route (q, k, v one projection; q and k normed and rotated together;
cached norm gains). What is here changes where the weights live and how a matmul reads them, installed
on the model as the kernels `model.gemma3.project` calls for each group of linears:

  - `relayout_weights` (CPU fp32): MKL's 1-row fp32 matmul streams a wide weight [N, K] 1.4-1.8x faster
    from a [K, N] row-major buffer than from [N, K] (it is memory bound; measured on AMD EPYC Zen 3 and
    Zen 4). So q, k, v (and gate, up; o_proj and the tied head when wide) become column blocks of one
    [K, sum N] buffer, each `weight` a transposed view into it: same values and shapes, no copy kept.
    A group then runs as one matmul. `state_dict()` still returns contiguous tensors in the official
    layout (a hook copies the views), so every saver writes what it would have written.
  - `prepack` (CPU fp32): a second copy of the linear weights in oneDNN's blocked layout for steps of
    several rows. MKL's sgemm re-packs a whole weight on every call with 2+ rows (768 x 6144: 2.1 ms at
    4 rows against 0.46 ms at 1); oneDNN's prepacked linear takes 0.26 ms. Continuous batching needs it.
  - `compile`: the decode step compiled over the whole preallocated cache (masks from the step index, a
    tensor), so its shapes stay static as the cache fills. On the CPU ahead of time (`engine.aot`: torch.export
    + AOTInductor, one C++ function per step, no per-step guards or Python wrapper); elsewhere, or where the
    export fails, through `torch.compile` (inductor).

Quantized layers (int4, int8, 16-bit) of one group run as one call of their kernel (`GroupedLayers`: the
input quantized or read once, one parallel loop over all their weights): a small model's decode step is
mostly per-call costs (85 kernel calls per token at 130M become 49). For the same reason, in such a quantized
decoder on the CPU (fp32 activations, or bf16 for a model loaded in bf16, as the 4b is), the RMSNorms run as one
op each (`native.rms_norm`, installed on the norms as `fused`: ~20 -> ~9 us per norm from Python, 61 per 130M
step; 27 -> 10 us at 4b in bf16), the MLPs' gelu(gate) * up as one (`native.gelu_tanh_mul`, installed as `act`:
34 -> 22 us at 4b in bf16), and decode steps attend through `native.decode_attention` (installed as `attend`; torch's
CPU SDPA reads the cache at ~5 GB/s for one query). The kernels take and return bf16 rows as they are (no
conversion op around each call). At 4b int4, 2 threads, the eager step went from ~95 to ~72 ms with these.

Kernels check on every call that the layers are still the ones they were made for (a quantized layer,
an adapter or a replaced weight runs through its module instead), and are never used with autograd.
"""

from __future__ import annotations

import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from openmedgemma.config import FULL, SLIDING
from openmedgemma.engine import native
from openmedgemma.engine.aot import AotDecodeStep, AotUnavailable


def _groups(language_model):
    """(parent module, kernel attribute, linear names) of each group of linears sharing an input."""
    for layer in language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        yield attn, "qkv_kernel", ("q_proj", "k_proj", "v_proj")
        yield attn, "o_kernel", ("o_proj",)
        yield mlp, "gate_up_kernel", ("gate_proj", "up_proj")
        yield mlp, "down_kernel", ("down_proj",)


def _cpu_fp32(language_model) -> bool:
    weight = language_model.embed_tokens.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def onednn_prepack_available(language_model) -> bool:
    """oneDNN's prepacked linear (the ops inductor's CPU freezing uses) for fp32 weights on the CPU."""
    return (_cpu_fp32(language_model) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # fmt: skip


def relayout_weights(language_model) -> None:
    """Re-lay out the decoder's plain CPU fp32 linear weights in place (see the module docstring); idempotent.

    Plain bias-free `nn.Linear`s only (quantized layers and adapters are left alone). Narrow groups
    (down_proj) are already in their fast layout. Afterwards `state_dict()` copies the views back to
    contiguous [N, K] tensors.
    """
    if not _cpu_fp32(language_model):
        return  # measured for fp32 MKL only
    for parent, _, names in _groups(language_model):
        group = [getattr(parent, n) for n in names]
        if all(type(m) is nn.Linear and m.bias is None for m in group) and fused_buffer(group) is None:
            _relayout(group)
    emb = language_model.embed_tokens
    if emb.weight.shape[0] >= emb.weight.shape[1] and emb.weight.stride(1) == 1:
        _relayout((emb,))
    if not getattr(language_model, "_contiguous_state_dict", False):
        language_model.register_state_dict_post_hook(_contiguous_state)
        language_model._contiguous_state_dict = True


def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the re-laid-out weights as contiguous tensors of their own (official layout)."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def _relayout(modules) -> None:
    weights = [m.weight for m in modules]
    if sum(w.shape[0] for w in weights) < weights[0].shape[1]:
        return  # narrow: [N, K] row-major is already the fast layout
    with torch.no_grad():
        buffer = torch.cat([w.detach().t() for w in weights], 1)  # [K, sum N], row-major
    start = 0
    for m, w in zip(modules, weights):
        m.weight.data = buffer[:, start : start + w.shape[0]].t()
        start += w.shape[0]


def fused_buffer(modules) -> torch.Tensor | None:
    """The [K, sum N] buffer `relayout_weights` put these linears' weights in (a view), or None. Reads no data
    pointer: under torch.export the weights are stand-ins that keep only strides, offsets and shared storage."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in modules):
        return None
    weights = [m.weight for m in modules]
    first = weights[0]
    total = sum(w.shape[0] for w in weights)
    storage, start = first.untyped_storage()._cdata, first.storage_offset()
    for w in weights:  # consecutive column blocks of one buffer, in order
        if w.stride() != (1, total) or w.storage_offset() != start or w.untyped_storage()._cdata != storage:
            return None
        start += w.shape[0]
    return first.detach().as_strided((first.shape[1], total), (total, 1), first.storage_offset())


class FusedLinears:
    """The kernel `model.gemma3.project` calls for one group of plain linears: one matmul over their re-laid-out
    buffer, or (prepack, several rows) over oneDNN's copy of their weights. Returns None whenever the group
    is no longer the plain linears it was made for."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], prepack: bool):
        self.parent = parent
        modules = tuple(getattr(parent, n) for n in names)
        # what the kernel was made from: each layer, its weight, where that weight's data lives
        self.members = tuple((n, m, m.weight, m.weight.data_ptr()) for n, m in zip(names, modules))
        self.buffer = fused_buffer(modules)
        self.onednn: torch.Tensor | None = None
        self.versions: tuple[int, ...] | None = None
        if prepack:
            self._reorder()
        self.traceable = self.onednn is None  # no state to refresh: the compiled decode step may run it

    def _reorder(self) -> None:
        weights = [w for _, _, w, _ in self.members]
        self.versions = tuple(w._version for w in weights)
        self.onednn = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), None)

    def __reduce__(self):
        # a copied or pickled model carries no kernels (they belong to the engine that made them, and a
        # oneDNN copy has no storage to copy): the copy runs its modules until an engine installs new ones
        return type(None), ()

    @property
    def nbytes(self) -> int:
        return 0 if self.onednn is None else self.onednn.numel() * self.onednn.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        own = self.parent._modules
        if torch.compiler.is_exporting():
            return self._exported(x)
        for name, module, weight, ptr in self.members:
            if own[name] is not module or module._parameters["weight"] is not weight or weight.data_ptr() != ptr:
                return None  # replaced (quantized, adapted, new data): the modules know what to do
        if self.versions is not None and self.versions != tuple(m[2]._version for m in self.members):
            self._reorder()  # trained in place since it was made (the re-laid-out buffer is the weights themselves)
        if self.onednn is not None and (x.numel() > x.shape[-1] or self.buffer is None):  # several rows
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, None, "none", [], "")
        return self._multiply(x, self.buffer, self.members[0][2])

    def _exported(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decode step's matmul as torch.export traces it (`engine.aot`): the weights are stand-ins then
        (no identity or data to check against; the compiled step checks the model before it runs), so the
        buffer is found from the layers' layout as they are now."""
        own = self.parent._modules
        if any(own[name] is not module for name, module, _, _ in self.members) or self.onednn is not None:
            return None
        modules = [module for _, module, _, _ in self.members]
        return self._multiply(x, fused_buffer(modules), modules[0].weight)

    def _multiply(self, x: torch.Tensor, buffer: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
        """x times the re-laid-out buffer [K, sum N] (or, for a group of one linear without one, its weight
        [N, K]); decode rows split over the threads. None where neither applies."""
        parts = torch.get_num_threads()
        if parts > 1 and x.numel() // x.shape[-1] <= SPLIT_MAX_ROWS:
            if buffer is not None:
                y = split_matmul(x, buffer, parts, columns=True)
            elif len(self.members) == 1:
                y = split_matmul(x, weight.detach(), parts, columns=False)
            else:
                y = None
            if y is not None:
                return y
        return None if buffer is None else torch.matmul(x, buffer)


SPLIT_MAX_ROWS = 8


def split_matmul(x: torch.Tensor, w: torch.Tensor, parts: int, columns: bool) -> torch.Tensor | None:
    """x [..., K] times a CPU fp32 weight as `parts` blocks of outputs in one batched matmul: w is [K, N]
    row-major (columns=True: a re-laid-out buffer) or [N, K] row-major (a linear's weight: x @ w.T). MKL runs a
    1-row matmul on one thread whatever the thread count (measured: 2 threads stream 768 x 6144 at 22.8 GB/s,
    as 1 does); a batch of `parts` 1-row products is spread over the threads, each a single-threaded matmul
    (2 parts on 2 threads: 32.6 GB/s; a [N, K] 768 x 3072: 31.7 against 18.8). None where N does not split
    evenly or w is not row-major (the caller runs one matmul)."""
    k = x.shape[-1]
    n = w.shape[1] if columns else w.shape[0]
    if n % parts or not w.is_contiguous() or w.shape[0 if columns else 1] != k:
        return None
    rows = x.reshape(-1, k)
    if columns:  # column blocks of [K, N]: strided views
        blocks = w.view(k, parts, n // parts).permute(1, 0, 2)
    else:  # row blocks of [N, K], transposed
        blocks = w.view(parts, n // parts, k).transpose(1, 2)
    # baddbmm, not bmm: inductor rewrites a CPU bmm of 1-row products as its own mul + sum loop (reading the
    # weight in column strips: 30% slower than eager at 130M), while baddbmm stays the BLAS call
    y = torch.baddbmm(x.new_zeros(()), rows.expand(parts, *rows.shape), blocks, beta=0)  # [parts, M, N / parts]
    return y.permute(1, 0, 2).reshape(*x.shape[:-1], n)


class GroupedLayers:
    """The kernel `model.gemma3.project` calls for a group of quantized layers of one kind (q, k, v; gate, up):
    their class's `group_forward` runs them in one kernel call. Returns None when a layer was replaced or the
    kernel does not take this input (e.g. prefill rows), so the layers run one by one. Holds no weights (each
    call reads the layers' own buffers), so torch.compile can trace it."""

    traceable = True

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        self.parent, self.names = parent, names
        self.layers = tuple(getattr(parent, n) for n in names)
        self.run = type(self.layers[0]).group_forward

    @staticmethod
    def fits(group) -> bool:
        """Two or more layers of one class that has `group_forward`, one mode, one input width."""
        first = group[0]
        return (len(group) > 1 and hasattr(type(first), "group_forward")
                and all(type(m) is type(first) and m.mode == first.mode and m.in_features == first.in_features
                        for m in group))  # fmt: skip

    def __reduce__(self):
        return type(None), ()  # as FusedLinears: a copy runs its modules until an engine installs kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        own = self.parent._modules
        if any(own[name] is not layer for name, layer in zip(self.names, self.layers)):
            return None  # replaced: the layers run one by one
        return self.run(self.layers, x)


def install_kernels(language_model, *, prepack: bool = False) -> int:
    """Put a `FusedLinears` on every group of plain linears that has a fused buffer (or, with prepack, on every
    group), a `GroupedLayers` on every group of quantized layers that can run as one call; returns the bytes of
    the prepacked copies. Other groups get none."""
    prepack = prepack and onednn_prepack_available(language_model)
    total = 0
    for parent, attr, names in _groups(language_model):
        group = [getattr(parent, n) for n in names]
        kernel = None
        if all(type(m) is nn.Linear and m.bias is None for m in group):
            if prepack or fused_buffer(group) is not None or (len(group) == 1 and _cpu_fp32(language_model)):
                kernel = FusedLinears(parent, names, prepack)  # one linear: the split over threads only
                total += kernel.nbytes
        elif GroupedLayers.fits(group):
            kernel = GroupedLayers(parent, names)
        setattr(parent, attr, kernel)
    # only where the layers already run the native library (a plain fp32 model never waits for its build), on
    # fp32 or bf16 activations (a model loaded in bf16, as the 4b is)
    quantized = any(hasattr(type(m), "group_forward") for m in language_model.layers.modules())
    weight = language_model.embed_tokens.weight
    pointwise = (quantized and weight.device.type == "cpu" and weight.dtype in native.ACTIVATIONS
                 and native.int8_gemv_available())  # fmt: skip
    for module in _norms(language_model):
        module.fused = native.rms_norm if pointwise else None
    for layer in language_model.layers:
        layer.self_attn.attend = native.decode_attention if pointwise else None
        layer.mlp.act = native.gelu_tanh_mul if pointwise else None
    return total


def _norms(language_model):
    """The decoder's RMSNorms (q_norm also norms k: `GemmaAttention.qk_gain`)."""
    for layer in language_model.layers:
        yield from (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                    layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm)  # fmt: skip
    yield language_model.norm


def remove_kernels(language_model) -> None:
    """Take the installed kernels off (before replacing layers: a kernel keeps its layers' weights alive)."""
    for parent, attr, _ in _groups(language_model):
        setattr(parent, attr, None)
    for module in _norms(language_model):
        module.fused = None
    for layer in language_model.layers:
        layer.self_attn.attend = layer.mlp.act = None


class DecoderRunner:
    """How the engine runs the decoder: the model's own forward, with the options above.

    relayout: `relayout_weights` (CPU fp32; on by default: same values, `state_dict()` unchanged);
    prepack: oneDNN copies for multi-row steps (memory: `prepacked_bytes`); compile: compile the decode step,
    True (ahead of time on the CPU, else torch.compile), "aot" or "dynamo" (torch.compile) to choose;
    `compile_seconds` says how long compiling took, `compiled_by` which ran. Without relayout and prepack the
    model runs exactly as `language_model(...)` does.
    """

    def __init__(self, language_model, *, compile: bool | str = False, prepack: bool = False, relayout: bool = True):
        if compile not in (False, True, "aot", "dynamo"):
            raise ValueError(f"compile must be True, False, 'aot' or 'dynamo', got {compile!r}")
        self.lm = language_model
        if relayout:
            relayout_weights(language_model)
        self.prepack = prepack and onednn_prepack_available(language_model)
        self.prepacked_bytes = install_kernels(language_model, prepack=self.prepack)
        self.compile = compile
        self._aot: AotDecodeStep | None | bool = None if compile in (True, "aot") else False  # False: torch.compile
        self.compiled_by: str | None = None  # "aot" or "torch.compile", once a compiled step ran
        self._compiled = None
        self.compile_seconds = 0.0

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, kv_cache) -> torch.Tensor:
        """Any number of tokens: x [B, T, H] embeddings, positions [B, T] -> normed hidden states [B, T, H]."""
        return self.lm(x, positions, masks, kv_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied head (`MedGemma.logits`), on CPU fp32 decode rows spread over the threads (`split_matmul`)."""
        table = self.lm.embed_tokens.weight
        parts = torch.get_num_threads()
        if parts > 1 and hidden.numel() <= SPLIT_MAX_ROWS * hidden.shape[-1] and not torch.is_grad_enabled() and (
            _cpu_fp32(self.lm) and hidden.dtype == torch.float32
        ):
            columns = not table.is_contiguous()  # re-laid out: a transposed view of [K, V]
            y = split_matmul(hidden, table.detach().t() if columns else table.detach(), parts, columns=columns)
            if y is not None:
                return y
        return F.linear(hidden, table)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, masks: dict, kv_cache) -> torch.Tensor:
        """One token per row: tokens [B], positions [B, 1] -> normed hidden states [B, H]."""
        if self.compile:
            out = self._compiled_decode(tokens, positions, kv_cache)
            if out is not None:  # None: the model changed since the ahead-of-time compile (see engine/aot.py)
                return out
        return self.lm(self.lm.embed(tokens[:, None]), positions, masks, kv_cache)[:, -1]

    # ------------------------------------------------------------------ compiled decode

    def _compiled_decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache) -> torch.Tensor:
        """`decode` compiled (None: the model changed since, run it eagerly); `kv_cache.begin` has run (it keeps the
        slot bookkeeping)."""
        step = torch.tensor([kv_cache.length - 1], device=tokens.device)  # time step of this token (a tensor:
        # a Python int would be baked into the graph and recompile every step)
        valid = (kv_cache.valid, kv_cache.ring_valid) if kv_cache.padded else None
        args = (tokens, positions, step, kv_cache.keys, kv_cache.values, valid)
        if self._aot is None and tokens.device.type == "cpu" and min(kv_cache.capacity, kv_cache.ring) >= 2:
            self._aot = AotDecodeStep(self)
        if self._aot:
            try:
                out = self._aot(*args, kv_cache)
                self.compile_seconds = self._aot.seconds
                self.compiled_by = "aot" if out is not None else None
                return out
            except AotUnavailable as err:  # torch.compile instead, where it can trace the layers
                self._aot = False
                if any(getattr(m, "traceable", True) is False for m in self.lm.modules()):
                    print(f"openmedgemma: the decode step runs uncompiled: its layers cannot be traced ({err})",
                          file=sys.stderr)  # fmt: skip
                    self.compile = False  # graph breaks at every layer: 130M int8-dynamic 18.9 against 10.9 ms
                    return None
                print(f"openmedgemma: the decode step is compiled with torch.compile instead of ahead of time ({err})",
                      file=sys.stderr)  # fmt: skip
        if self._compiled is None:  # dynamic shapes: other batch sizes / cache capacities reuse it
            # dynamo keeps compiled code per code object and, past `recompile_limit` (8) entries, silently runs it
            # eagerly; every runner (its own model: other layer types, shapes) compiles a private copy of the
            # step's code, so several compiled engines in one process do not exhaust one shared cache
            code = DecoderRunner._static_step.__code__.replace()
            step = types.FunctionType(code, DecoderRunner._static_step.__globals__, "_static_step")
            self._compiled = torch.compile(types.MethodType(step, self), dynamic=True)
            t = time.perf_counter()
            out = self._compiled(*args)  # the first call builds it
            self.compile_seconds = time.perf_counter() - t
            self.compiled_by = "torch.compile"
            return out
        return self._compiled(*args)

    def _static_step(self, tokens, positions, step, keys, values, valid) -> torch.Tensor:
        """A decode step over the whole preallocated cache: slot `step` (global layers) or `step % ring`
        (sliding) is written, and a mask hides slots not yet written (and padding: `valid`, kept by
        `KVCache.begin`). Same keys and values as the eager step, so the same function."""
        kinds = self.lm.config.layer_types
        capacity = next((k.shape[2] for k, kind in zip(keys, kinds) if kind == FULL), 0)
        ring = next((k.shape[2] for k, kind in zip(keys, kinds) if kind == SLIDING), 0)
        if valid is None:
            masks = {FULL: (torch.arange(capacity, device=step.device) <= step)[None, None, None],
                     SLIDING: (torch.arange(ring, device=step.device) <= step)[None, None, None]}  # fmt: skip
        else:
            masks = {FULL: valid[0][:, None, None], SLIDING: valid[1][:, None, None]}
        slots = _StaticSlots(keys, values, kinds, step, ring)
        return self.lm(self.lm.embed(tokens[:, None]), positions, masks, slots)[:, -1]


class _StaticSlots:
    """`KVCache.update` for `_static_step`: write this step's slot, attend over the whole layer buffer."""

    def __init__(self, keys, values, kinds, step, ring):
        self.keys, self.values, self.kinds = keys, values, kinds
        self.slots = {FULL: step, SLIDING: step % max(ring, 1)}

    def update(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slots[self.kinds[idx]]
        self.keys[idx].index_copy_(2, slot, k)
        self.values[idx].index_copy_(2, slot, v)
        return self.keys[idx], self.values[idx]
