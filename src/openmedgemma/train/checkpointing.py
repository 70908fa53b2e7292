"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    <output_dir>/checkpoints/step_0000100/
        model.safetensors   the trainable parameters (frozen ones come back from the base model)
        optimizer.pt        AdamW state keyed by parameter name (full, unsharded)
        state.pt            step, scheduler, data position, stage state (RL rollout buffer), the RNG states
                            of every rank (python, numpy, torch, cuda), the config
    <output_dir>/checkpoints/latest     name of the newest complete checkpoint

A checkpoint is written under `step_N.tmp`, flushed to disk and renamed: a run killed at any moment (even
SIGKILL in the middle of a save) leaves only complete checkpoints behind. `.pt` files are read back with
`torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openmedgemma.errors import CheckpointError
from openmedgemma.train import distributed as D

PREFIX = "step_"


def _clean(name: str) -> str:
    for wrapper in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def trainable_names(module: nn.Module) -> set[str]:
    return {_clean(n) for n, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save


def save(run_dir: Path, step: int, module: nn.Module, optimizer, state: dict, info: D.DistInfo, keep: int) -> Path | None:
    """Write checkpoint `step` (all ranks call this; rank 0 writes). Returns its folder on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    wanted = trainable_names(module)
    model_sd = {k: v for k, v in get_model_state_dict(module, options=options).items() if k in wanted}
    optim_sd = get_optimizer_state_dict(module, optimizer, options=options)
    rngs = D.all_gather_object(rng_state(), info)
    folder = None
    if info.is_main:
        from safetensors.torch import save_file

        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        folder = root / f"{PREFIX}{step:07d}"
        tmp = root / f"{PREFIX}{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({**state, "step": step, "rng": rngs}, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync(f)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        _fsync(root)
        latest = root / "latest.tmp"
        latest.write_text(folder.name + "\n", encoding="utf-8")
        _fsync(latest)
        os.replace(latest, root / "latest")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in Path(root).glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / "state.pt").is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder (its newest complete checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text(encoding="utf-8").strip()
        if (candidate / "state.pt").is_file():
            return candidate
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"{path}: no complete training checkpoint to resume from (expected checkpoints/step_N/)")
    return found[-1]


# ----------------------------------------------------------------------------- load


def saved_config(folder: Path) -> dict | None:
    """The config (TrainConfig.to_dict()) the checkpoint in `folder` was trained with; None if it holds none."""
    if not (folder / "state.pt").is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint, state.pt is missing")
    return torch.load(folder / "state.pt", weights_only=True).get("config")


def load(folder: Path, module: nn.Module, optimizer, info: D.DistInfo) -> dict:
    """Restore parameters, optimizer and this rank's RNG from `folder`; return the saved state dict."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    for name in ("model.safetensors", "optimizer.pt", "state.pt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: incomplete checkpoint, {name} is missing")
    model_sd = load_file(str(folder / "model.safetensors"))
    wanted = trainable_names(module)
    if set(model_sd) != wanted:
        extra, missing = sorted(set(model_sd) - wanted), sorted(wanted - set(model_sd))
        raise CheckpointError(
            f"{folder}: the checkpoint's trainable parameters differ from this run's (unexpected {extra[:5]}, "
            f"missing {missing[:5]}); resume with the same model, LoRA and freeze settings"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, model_sd, options=options)
    optim_sd = torch.load(folder / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(module, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    state = torch.load(folder / "state.pt", weights_only=True)
    rngs = state.pop("rng")
    if len(rngs) != info.world:
        raise CheckpointError(f"{folder}: saved by {len(rngs)} process(es), resumed with {info.world}; use the same number")
    set_rng_state(rngs[info.rank])
    return state
