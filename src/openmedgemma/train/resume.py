"""What a resumed run may change in its config, compared with the config its checkpoint was trained with.

- Bookkeeping (where files go, how often to log, evaluate or save, micro-batching, evaluation sets): free.
- The schedule (train.steps, optim.*): the optimizer settings and the lr schedule are rebuilt from the new
  config at the resumed step, and the trainer says so (an extended run keeps decaying over the new length
  instead of running its extra steps at the old schedule's end value).
- Settings read afresh at every step (LoRA dropout, precision): applied as given, and the trainer says so.
- Anything else (model, data, batch size, LoRA, freezing, the stage's own settings, seed, ...): the run
  would no longer be the one that was checkpointed, so the resume is refused, naming each differing key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openmedgemma.errors import CheckpointError

FREE = ("output_dir", "data.data_dir", "data.cache_mb", "train.device", "train.log_every", "train.eval_every",
        "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.micro_batch_size", "eval.")  # fmt: skip
SCHEDULE = ("train.steps", "optim.")
TUNABLE = ("lora.dropout", "train.precision")

Change = tuple[str, Any, Any]  # key, saved value, new value


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists (data sources) stay whole values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differences(saved: dict, current: dict) -> list[Change]:
    old, new = flatten(saved), flatten(current)
    missing = object()
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)]  # fmt: skip


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def check(folder: Path, saved: dict | None, current: dict) -> list[Change]:
    """The allowed changes (schedule and tunable ones) to report; raises CheckpointError for a change that
    breaks the run. `needs_new_schedule` tells whether the lr schedule must be rebuilt."""
    if saved is None:  # checkpoints written before configs were saved with them: nothing to compare
        return []
    changes = [c for c in differences(saved, current) if not _matches(c[0], FREE)]
    breaking = [c for c in changes if not _matches(c[0], SCHEDULE + TUNABLE)]
    if breaking:
        listed = "; ".join(describe(c) for c in breaking)
        raise CheckpointError(
            f"{folder}: the config differs from the one this run was trained with, so resuming would not continue "
            f"the same run: {listed}. Restore these values to resume, or start a new run in another output_dir "
            "(train.steps and optim.* may change on resume: the lr schedule is then rebuilt)"
        )
    return changes


def needs_new_schedule(changes: list[Change]) -> bool:
    return any(_matches(c[0], SCHEDULE) for c in changes)


def describe(change: Change) -> str:
    key, old, new = change
    return f"{key} {_show(old)} -> {_show(new)}"


def _show(value: Any) -> str:
    text = "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
