"""The task registry: `get_task(name, data_dir, **options)` and `list_tasks()`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openmedgemma.errors import ConfigError

from . import classification, ehrqa, mcq, report_gen, siglip_tasks, vqa  # noqa: F401  (they register tasks)
from .base import TASKS, ChatTask, Example, Task, register
from .embedding import EmbeddingTask

__all__ = ["TASKS", "ChatTask", "EmbeddingTask", "Example", "Task", "get_task", "list_tasks", "register"]


def get_task(name: str, data_dir: Path | str, **options: Any) -> Task:
    """A configured task. Options are the task's `option_defaults` keys (strings are coerced)."""
    if name not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise ConfigError(f"unknown task {name!r}; known tasks: {known} (see `openmedgemma eval --list`)")
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
