"""The task registry: `get_task(name, data_dir, **options)` and `list_tasks()`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from openmedgemma.errors import ConfigError

from . import classification, ehrqa, mcq, report_gen, siglip_tasks, vqa  # noqa: F401  (they register tasks)
from .base import TASKS, ChatTask, Example, Task, register
from .embedding import EmbeddingTask

__all__ = ["TASKS", "ChatTask", "EmbeddingTask", "Example", "Task", "get_task", "list_tasks", "register"]


def check_task_names(names: list[str]) -> None:
    """One ConfigError naming every unknown task, the closest known names and all of them."""
    unknown = [n for n in names if n not in TASKS]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.5)
        parts.append(f"{name!r}" + (f" (closest: {', '.join(close)})" if close else ""))
    label = "unknown task" if len(unknown) == 1 else "unknown tasks"
    raise ConfigError(f"{label} {'; '.join(parts)}; known tasks: {', '.join(sorted(TASKS))} "
                      "(see `openmedgemma eval --list`)")  # fmt: skip


def get_task(name: str, data_dir: Path | str, **options: Any) -> Task:
    """A configured task. Options are the task's `option_defaults` keys (strings are coerced)."""
    check_task_names([name])
    return TASKS[name](data_dir, **options)


def list_tasks() -> list[dict]:
    """name, kind, description and options of every registered task, sorted by name."""
    return [
        {
            "name": cls.name,
            "kind": cls.kind,
            "description": cls.description,
            "options": dict(cls.option_defaults),
            "primary_metric": cls.primary_metric,
        }
        for cls in sorted(TASKS.values(), key=lambda c: c.name)
    ]
