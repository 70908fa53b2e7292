"""Checkpoint I/O in the Hugging Face layout: (sharded) safetensors + model.safetensors.index.json.

Reading is lazy and memory-mapped: each file is mapped copy-on-write (`UntypedStorage.from_file`,
shared=False), and tensors are views into it, so loading touches no weight until it is used and
peak memory stays near one copy of the weights; the file is never written. A dtype change copies
one tensor at a time. Only safetensors is read: pickle checkpoints (.bin/.pt) can run code on load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from openmedgemma.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data mapped lazily."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._storage = None
        self._read_header()

    def _read_header(self):
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (declares {n} header bytes)")
                header = json.loads(f.read(n))
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read: {err.strerror or err}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (data_start + int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unreadable entry {entry!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or end > size or begin < data_start:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ({entry['dtype']} {list(shape)}) lies outside the file "
                    "or has the wrong byte size: the file is truncated or corrupt"
                )
            self.tensors[name] = TensorInfo(self.path, dtype, shape, begin, end)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self._storage is None:
            size = self.path.stat().st_size
            self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
        if info.begin % info.dtype.itemsize == 0:
            t = torch.empty(0, dtype=info.dtype)
            return t.set_(self._storage, info.begin // info.dtype.itemsize, info.shape)
        # Unaligned (possible after odd-sized tensors of narrower types): copy out.
        raw = self._storage[info.begin : info.end]
        return torch.empty(0, dtype=torch.uint8).set_(raw).view(info.dtype).reshape(info.shape).clone()


class Checkpoint:
    """All weight files of a checkpoint folder, addressed by on-disk tensor name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = [SafetensorsFile(p) for p in weight_files(self.folder)]
        self.index: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.tensors:
                if name in self.index:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is stored in two files ({self.index[name].path.name}, {f.path.name})")
                self.index[name] = f

    def names(self) -> list[str]:
        return list(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name].tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self.index[name].get(name)

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the floating-point weights (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for f in self.files:
            for info in f.tensors.values():
                if info.dtype.is_floating_point:
                    counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (give the checkpoint folder, not a file)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CheckpointError(f"{folder}: folder is not readable")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}). openmedgemma loads safetensors only: "
            "unpickling a file can execute arbitrary code. Convert it once with a trusted tool in an isolated "
            "environment (e.g. transformers' save_pretrained(safe_serialization=True))."
        )
    raise CheckpointError(f"{folder}: no weights found (expected {SINGLE_NAME} or {INDEX_NAME} with its shards)")


def load_into(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    to_internal: Callable[[str], str | None],
    dtype: torch.dtype | None,
    device: torch.device | str | None = None,
) -> None:
    """Fill `model` (built on the meta device) from `ckpt`, checking every name and shape first.

    `to_internal` maps an on-disk name to the model's parameter name, or None to skip it (e.g. a
    tied lm_head). Raises one CheckpointError that lists all missing, unexpected and mis-shaped tensors.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for disk_name in ckpt.names():
        name = to_internal(disk_name)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(disk_name)
        elif name in mapping:
            raise CheckpointError(f"{ckpt.folder}: {disk_name!r} and {mapping[name]!r} are both stored for {name!r}")
        else:
            mapping[name] = disk_name
    missing = sorted(set(expected) - set(mapping))
    mis_shaped = [
        f"{disk} (file {list(ckpt.info(disk).shape)}, model {list(expected[name])})"
        for name, disk in mapping.items()
        if ckpt.info(disk).shape != expected[name]
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise CheckpointError(f"{ckpt.folder}: the weights do not match the config. " + "; ".join(problems))
    state = {}
    for name, disk in mapping.items():
        t = ckpt.get(disk)
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)


def save_sharded(
    tensors: dict[str, torch.Tensor],
    folder: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as safetensors shards (+ index when more than one), each file atomically.

    Old weight files of an earlier save in the same folder are removed only after the new ones exist.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    written = []
    for shard, fname in zip(shards, names):
        tmp = folder / (fname + ".tmp")
        save_file(shard, str(tmp), metadata=meta)
        os.replace(tmp, folder / fname)
        written.append(folder / fname)
    index = folder / INDEX_NAME
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: fname for shard, fname in zip(shards, names) for k in shard}
        _write_json_atomic(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif index.exists():
        index.unlink()
    keep = set(names)
    for old in folder.glob("model*.safetensors"):
        if old.name not in keep:
            old.unlink()
    return written


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_config(folder: str | Path, config: dict) -> None:
    _write_json_atomic(Path(folder) / "config.json", config)


def rename_rules(rules: Iterable[tuple[str, str]], skip: Iterable[str] = ()) -> Callable[[str], str | None]:
    """A name mapper from prefix rules (first match wins); names in `skip` map to None."""
    rules, skip = list(rules), set(skip)

    def mapper(name: str) -> str | None:
        if name in skip:
            return None
        for old, new in rules:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    return mapper
