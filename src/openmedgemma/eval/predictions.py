"""predictions.jsonl: raw model answers, appended batch by batch so that a run can resume.

Line 1 is {"header": {...}} (task + options, model name, generation settings); every other line
is {"id", "prompt_sha", "output"}. A file whose header differs from the current run is refused,
as is a stored answer whose prompt no longer matches the data. A last line cut short by an
interruption is dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from openmedgemma.errors import ConfigError


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [
        f"{k}: file has {old.get(k)!r}, this run has {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]
    return "; ".join(diffs)


class PredictionStore:
    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # as it will read back from JSON

    def load(self) -> dict[str, dict]:
        """Records already answered (by id); creates the file with its header if absent."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"header": self.header}, ensure_ascii=False) + "\n")
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, partial = lines[:-1], lines[-1]
        try:
            first = json.loads(complete[0]) if complete else None
        except json.JSONDecodeError:
            first = None
        if not isinstance(first, dict) or "header" not in first:
            raise ConfigError(
                f"{self.path}: not a predictions file of this harness (no header line); "
                "delete it or choose another --out folder"
            )
        if first["header"] != self.header:
            difference = _describe_difference(first["header"], self.header)
            raise ConfigError(
                f"{self.path} was written by a different run ({difference}); "
                "delete it or choose another --out folder"
            )
        records = {}
        for number, line in enumerate(complete[1:], 2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"{self.path}: line {number} is not valid JSON; delete the file to start over"
                ) from None
            records[record["id"]] = record
        if partial.strip():  # interrupted in the middle of a line: drop it
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write("\n".join(complete) + "\n")
        return records

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
