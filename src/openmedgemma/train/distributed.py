"""Data parallelism: DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`), launched by `torchrun`.

Every rank draws the same global batch from the mixture and trains on its own contiguous slice; losses are
sums divided by the global count (all-reduced), so N ranks compute the gradient of the same objective as one
process with the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from openmedgemma.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(strategy: str, backend: str, device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (RANK / WORLD_SIZE / MASTER_ADDR in the environment)."""
    world = launched_world()
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:  # one process: nothing to wrap or shard
        return DistInfo(strategy="none")
    if strategy == "none":
        raise ConfigError(f"launched with WORLD_SIZE={world} but distributed.strategy = 'none'; use ddp or fsdp")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), strategy)
    return info


def wrap(module: nn.Module, info: DistInfo, device: torch.device, blocks: list[nn.Module],
         find_unused: bool = False) -> nn.Module:
    """DDP, or FSDP2 with each transformer block sharded on its own and the rest at the root."""
    if info.strategy == "ddp" and info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    return module


def no_sync(module: nn.Module, info: DistInfo, last: bool):
    """Skip gradient communication on all but the last micro-batch of an accumulation."""
    if last or not info.enabled:
        return contextlib.nullcontext()
    if info.strategy == "ddp":
        return module.no_sync()
    if info.strategy == "fsdp":
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (same shape on each rank); backward sums the gradient of the whole over
    the ranks and hands each rank the rows it gave."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x concatenated along dim 0, differentiable (each rank's gradient reaches its own rows)."""
    return _GatherRows.apply(x)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
