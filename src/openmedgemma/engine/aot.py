"""The decode step compiled ahead of time for the CPU: `torch.export` + AOTInductor (`DecoderRunner(compile=True)`).

A small model's decode step on the CPU is mostly per-call costs. `torch.compile` removes the Python of the
ops but keeps, per step, dynamo's guards over every weight and module (~1 ms at 130M), the prologue that
gathers the weights as graph inputs (~0.5 ms) and a Python wrapper calling each kernel (~1.5 ms). Exported and
compiled by AOTInductor, the same step (`DecoderRunner._static_step`, the model's own forward) is one C++
function: the weights are handed over once (`load_constants(..., user_managed=True)`: the model's own
tensors, no copy; in-place updates are seen), and a step costs its kernels.

What the guards did is done here, once per generation (the first step over a new KV cache; a model changed
in the middle of a generation is not supported anyway: its cache holds keys of the old weights): every
module, parameter, buffer and installed kernel must still be the object it was at export, with the same
storage (identity checks, 0.1-0.4 ms at 130M, most of it cache misses after a step has streamed the weights:
per step it would cost 6% of an int4 token). If not (a layer was replaced, adapters added, kernels removed),
the step says so once and runs eagerly from then on.

One artifact per batch size, mask kind (with / without padding) and thread count, for any cache capacity
(a dynamic dimension). Built once (~30 s at 130M) and kept in `$OPENMEDGEMMA_CACHE/aoti/`, named by a hash of the
exported graph and the weights' layout: a later process with the same architecture, format and kernels
loads it in well under a second. The package holds no weights.
"""

from __future__ import annotations

import hashlib
import operator
import os
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from openmedgemma.config import FULL


class AotUnavailable(RuntimeError):
    """The step could not be exported or compiled ahead of time (the caller keeps torch.compile)."""


class _Step(nn.Module):
    """What is exported: the runner's static step over its decoder (a module, so the weights are its state)."""

    def __init__(self, runner):
        super().__init__()
        self.lm = runner.lm
        self._runner = (runner,)  # not a submodule

    def forward(self, tokens, positions, step, keys, values, valid):
        runner = self._runner[0]
        return type(runner)._static_step(runner, tokens, positions, step, keys, values, valid)


class _Snapshot:
    """Every submodule, parameter, buffer and installed kernel hook of the decoder, and where each tensor's data
    lives: what the compiled step assumed. `unchanged()` checks them all (identity and data pointers, C loops)."""

    HOOKS = ("qkv_kernel", "o_kernel", "gate_up_kernel", "down_kernel", "attend", "fused")

    def __init__(self, lm: nn.Module):
        self.slots, self.objects, self.tensors = [], [], []
        for module in lm.modules():
            for d in (module._modules, module._parameters, module._buffers):
                for key, value in d.items():
                    self.slots.append((d, key))
                    self.objects.append(value)
                    if isinstance(value, torch.Tensor):
                        self.tensors.append(value)
            for key in self.HOOKS:
                if key in module.__dict__:
                    self.slots.append((module.__dict__, key))
                    self.objects.append(module.__dict__[key])
        self.ptrs = [t.data_ptr() for t in self.tensors]

    def unchanged(self) -> bool:
        now = [d.get(key) for d, key in self.slots]
        if not all(map(operator.is_, now, self.objects)):
            # another runner of the same model installs new but equal kernels; anything else is a change
            if not all(a is b or _same_kernel(a, b) for a, b in zip(now, self.objects)):
                return False
        return [t.data_ptr() for t in self.tensors] == self.ptrs


def _same_kernel(a, b) -> bool:
    """Two installed kernels of one class made for the same layers and weights (another runner of the same
    model installs new but equal ones: `engine.fast.FusedLinears` / `GroupedLayers`)."""
    if type(a) is not type(b):
        return False
    fa, fb = _made_for(a), _made_for(b)
    return bool(fa) and len(fa) == len(fb) and all(x is y or (type(x) in (int, str) and x == y) for x, y in zip(fa, fb))


def _made_for(kernel) -> list:
    parts = (getattr(kernel, "layers", ()), getattr(kernel, "members", ()))
    return [x for part in parts for item in part for x in (item if isinstance(item, tuple) else (item,))]


def cache_dir():
    from openmedgemma.engine import native

    return native.cache_dir().parent / "aoti"


class AotDecodeStep:
    """`_static_step`'s arguments in, hidden states out, through AOTInductor artifacts (one per batch size and
    mask kind). `__call__` returns None once the model changed (the caller then runs eagerly)."""

    def __init__(self, runner):
        self.module = _Step(runner)
        self.compiled: dict[tuple, object] = {}
        self.snapshot: _Snapshot | None = None
        self.stale = False
        self.seconds = 0.0  # building or loading, all artifacts
        self._generation = lambda: None  # a weak reference to the KV cache of the running generation

    def __call__(self, tokens, positions, step, keys, values, valid, cache) -> torch.Tensor | None:
        """cache: the KV cache object the step writes into (a new one starts a generation: check the model)."""
        if self.stale:
            return None
        fresh = self._generation() is not cache
        if fresh:
            self._generation = weakref.ref(cache)
        if fresh and self.snapshot is not None and not self.snapshot.unchanged():
            self.stale = True
            self.compiled.clear()
            print("openmedgemma: the model changed since its decode step was compiled (a layer, weight or kernel was "
                  "replaced); decode steps run uncompiled from now on", file=sys.stderr)  # fmt: skip
            return None
        key = (tokens.shape[0], valid is not None, torch.get_num_threads())
        run = self.compiled.get(key)
        if run is None:
            t = time.perf_counter()
            run = self.compiled[key] = self._build(tokens, positions, step, keys, values, valid)
            self.seconds += time.perf_counter() - t
        flat = [tokens, positions, step, *keys, *values, *(valid or ())]
        return run.loader.boxed_run(flat)[0]

    def _build(self, *args):
        with warnings.catch_warnings():  # torch's own pytree deprecation notice, not the user's concern
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return self._export_and_load(*args)

    def _export_and_load(self, tokens, positions, step, keys, values, valid):
        """Export (dynamic cache capacity and ring), then load the cached package or compile it."""
        from torch.export import Dim

        kinds = self.module.lm.config.layer_types
        capacity, ring = Dim("capacity", min=2), Dim("ring", min=2)
        kv = [{2: capacity if kind == FULL else ring} for kind in kinds]
        spec = (None, None, None, kv, kv, None if valid is None else ({1: capacity}, {1: ring}))
        args = (tokens, positions, step, keys, values, valid)
        try:
            with torch.no_grad():
                program = torch.export.export(self.module, args, dynamic_shapes=spec, strict=False)
        except Exception as err:  # noqa: BLE001 - any export failure: the caller keeps torch.compile
            raise AotUnavailable(f"torch.export: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
        if self.snapshot is None:
            self.snapshot = _Snapshot(self.module.lm)
        state = dict(self.module.named_parameters(remove_duplicate=False))
        state.update(self.module.named_buffers(remove_duplicate=False))
        layout = sorted((name, str(t.dtype), tuple(t.shape), t.stride(), t.storage_offset()) for name, t in state.items())
        from openmedgemma.engine import native

        inputs = [(str(a.dtype), a.dim()) for a in (tokens, positions, step, *keys, *values, *(valid or ()))]
        # inductor's own loops are built for this many threads; the graph's code does not show it
        key = hashlib.sha256(repr((program.graph_module.code, str(program.graph_signature), layout, inputs,
                                   torch.__version__, str(native.LOADED), torch.get_num_threads())).encode())  # fmt: skip
        path = cache_dir() / f"decode-step-{key.hexdigest()[:20]}.pt2"
        if not path.exists():
            print(f"openmedgemma: compiling the decode step ahead of time (once per model shape, format, batch size "
                  f"and thread count, ~30 s) into {path.parent}", file=sys.stderr)  # fmt: skip
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
            except OSError:  # e.g. a read-only home: for this process only
                path = Path(tempfile.mkdtemp(prefix="openmedgemma-aoti-")) / path.name
                fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
            os.close(fd)
            try:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=tmp, inductor_configs={"aot_inductor.package_constants_in_so": False})
                os.replace(tmp, path)
            except Exception as err:  # noqa: BLE001
                raise AotUnavailable(f"AOTInductor: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            run = torch._inductor.aoti_load_package(str(path))
            names = run.get_constant_fqns()
            missing = [n for n in names if n not in state]
            if missing:
                raise AotUnavailable(f"the compiled step holds tensors that are not the model's: {missing[:3]}")
            run.load_constants({n: state[n] for n in names}, check_full_update=True, user_managed=True)
        except Exception as err:  # noqa: BLE001 - e.g. a damaged file: built anew next time
            path.unlink(missing_ok=True)
            if isinstance(err, AotUnavailable):
                raise
            raise AotUnavailable(f"{path}: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
        return run
