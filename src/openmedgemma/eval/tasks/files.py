"""Reading dataset files in their published formats, with errors that name the file and problem."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterable

from openmedgemma.errors import DataError


def require_dir(data_dir: Path | str, task: str) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"{task}: data folder {path} does not exist or is not a folder")
    return path


def find_file(data_dir: Path | str, candidates: Iterable[str], task: str) -> Path:
    """The first of `candidates` (paths relative to `data_dir`) that is a file."""
    root = require_dir(data_dir, task)
    candidates = list(candidates)
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    looked = ", ".join(candidates)
    raise DataError(f"{task}: no data file found under {root} (looked for: {looked})")


def find_dir(data_dir: Path | str, candidates: Iterable[str], task: str) -> Path:
    root = require_dir(data_dir, task)
    candidates = list(candidates)
    for rel in candidates:
        if (root / rel).is_dir():
            return root / rel
    looked = ", ".join(c or "." for c in candidates)
    raise DataError(f"{task}: no data folder found under {root} (looked for: {looked})")


def find_containing(data_dir: Path | str, folders: Iterable[str], filename: str, task: str) -> Path:
    """The first of `folders` (relative to `data_dir`) that holds `filename`."""
    root = require_dir(data_dir, task)
    folders = list(folders)
    for rel in folders:
        if (root / rel / filename).is_file():
            return root / rel
    looked = ", ".join(str(Path(f) / filename) for f in folders)
    raise DataError(f"{task}: no data file found under {root} (looked for: {looked})")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def read_json(path: Path) -> Any:
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None


def read_csv(path: Path, *, delimiter: str = ",", header: bool = True) -> list[dict] | list[list]:
    """Rows as dicts (header=True) or lists. Gzipped files (.gz) are read transparently."""
    try:
        with _open_text(path) as fh:
            reader = (
                csv.DictReader(fh, delimiter=delimiter) if header else csv.reader(fh, delimiter=delimiter)
            )
            rows = list(reader)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as err:
        raise DataError(
            f"{path}: cannot be read as a {'TSV' if delimiter == chr(9) else 'CSV'} file ({err})"
        ) from None
    if not rows:
        raise DataError(f"{path}: file has no data rows")
    return rows


def require_columns(path: Path, row: dict, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        have = ", ".join(repr(k) for k in list(row)[:12])
        raise DataError(f"{path}: missing column(s)/field(s) {missing}; found {have}")
