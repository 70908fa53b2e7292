"""The task abstraction and the task registry.

A task = a data adapter for an official file format + the report's prompt + an answer parser +
metrics. Chat tasks (`kind = "chat"`) turn data into `Example`s whose messages a `ChatModel`
answers; `score` turns the raw answers into metrics. Embedding tasks (`kind = "embedding"`)
evaluate an `Embedder` directly (see `embedding.py`).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from openmedgemma.errors import ConfigError


@dataclass
class Example:
    id: str
    messages: list[dict]
    target: Any
    meta: dict = field(default_factory=dict)


def image_descriptor(image: Any) -> str:
    """A stable description of an image for hashing prompts (file name, or pixel hash)."""
    if isinstance(image, (str, Path)):
        return "file:" + Path(image).name
    array = np.asarray(image)
    return f"array:{array.shape}:{hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()}"


def messages_digest(messages: list[dict]) -> str:
    """sha256 of the messages with images replaced by `image_descriptor` (resume check)."""

    def plain(item):
        if isinstance(item, dict):
            return {k: (image_descriptor(v) if k == "image" else plain(v)) for k, v in item.items()}
        if isinstance(item, list):
            return [plain(v) for v in item]
        return item

    blob = json.dumps(plain(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def user_turn(text: str, image: Any = None) -> list[dict]:
    """One user message; the image (if any) comes before the text, as in the report."""
    if image is None:
        return [{"role": "user", "content": text}]
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
        }
    ]


def prompt_text(messages: list[dict]) -> str:
    """All text of a conversation, concatenated (used by scripted models and summaries)."""
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(item["text"] for item in content if item.get("type") == "text")
    return "\n".join(parts)


def prompt_images(messages: list[dict]) -> list[Any]:
    images = []
    for message in messages:
        if not isinstance(message["content"], str):
            images.extend(item["image"] for item in message["content"] if item.get("type") == "image")
    return images


def _coerce(name: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"option {name}: expected true/false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"option {name}: expected {kind}, got {value!r}") from None
    if isinstance(default, (list, tuple)):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


class Task:
    """What every task has: a name, options, a data folder and protocol notes."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "chat" (ChatTask) or "embedding" (EmbeddingTask)
    description: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "accuracy"
    option_defaults: ClassVar[dict[str, Any]] = {}
    path_options: ClassVar[tuple[str, ...]] = ("file", "prompts")  # named by file stem in run_name
    hidden_options: ClassVar[tuple[str, ...]] = ()  # left out of run_name (still in the header)

    def __init__(self, data_dir: Path | str, **options: Any):
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            allowed = ", ".join(sorted(self.option_defaults)) or "none"
            raise ConfigError(f"task {self.name}: unknown option(s) {unknown}; allowed: {allowed}")
        self.data_dir = Path(data_dir)
        self.data_info: dict[str, Any] = {}  # what load_examples selected (written into results)
        self.options = dict(self.option_defaults)
        for key, value in options.items():
            self.options[key] = _coerce(key, value, self.option_defaults[key])

    @property
    def run_name(self) -> str:
        """The task name, plus the options that differ from the defaults (files by their stem)."""
        changed = []
        for key, value in sorted(self.options.items()):
            if value == self.option_defaults[key] or key in self.hidden_options:
                continue
            if key in self.path_options:
                value = Path(value).stem
            changed.append(f"{key}={','.join(value) if isinstance(value, (list, tuple)) else value}")
        return self.name + ("@" + "@".join(changed) if changed else "")

    def config(self) -> dict:
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        return {"task": self.name, "options": options}

    def notes(self) -> list[str]:
        """Plain statements of protocol choices, written into the results."""
        return []


class ChatTask(Task, ABC):
    """A task a ChatModel answers: examples in, raw answers out, `score` turns them into metrics."""

    kind = "chat"
    max_new_tokens: ClassVar[int] = 512

    @abstractmethod
    def load_examples(self) -> list[Example]: ...

    def generate(self, model, examples: list[Example], *, max_new_tokens: int, seed: int) -> list:
        """Raw answers for a batch: a string each, or a dict with the string under "output" and more fields
        to keep in predictions.jsonl. Tasks that drive the model through several calls (an agent) override it."""
        return model.generate([ex.messages for ex in examples], max_new_tokens=max_new_tokens, seed=seed)

    @abstractmethod
    def score(self, examples: list[Example], outputs: list[str], *, n_boot: int, seed: int) -> dict:
        """{"metrics": {name: estimate}, "counts": {...}, ...} for raw model outputs."""

    def baseline_outputs(self, examples: list[Example]) -> dict[str, list[str]]:
        """Constant answers (majority / prior) scored exactly like model answers."""
        return {}

    def baselines(self, examples: list[Example], *, n_boot: int, seed: int) -> dict[str, dict]:
        out = {}
        for label, outputs in self.baseline_outputs(examples).items():
            out[label] = self.score(examples, outputs, n_boot=n_boot, seed=seed)["metrics"]
        return out


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise RuntimeError(f"task {cls.name} registered twice")
    TASKS[cls.name] = cls
    return cls
