"""Distillation data: teacher distributions stored sparsely, as the MedGemma 1.5 report trains on
(256 teacher logits per token, sampled according to the teacher's probabilities).

A store is a folder:

    store.json                    {"format": "openmedgemma-teacher-store", "version": 1, "k", "selection",
                                   "vocab_size", "sequences", "targets", "shards": [...], "teacher"}
    teacher-00000.safetensors     input_ids int32 [N]  labels int32 [N]  seq_offsets int64 [S + 1]
                                  indices int32 [M, k]  probs float32 [M, k]  target_offsets int64 [S + 1]

For each sequence, every labelled token t (labels[t] != -100, t >= 1) has one row of (indices, probs): the
teacher's distribution at position t - 1, which predicts token t. `selection="sample"` draws k distinct ids
without replacement with probability proportional to the teacher's (the report's sampling); `"topk"` keeps
the k most likely. `probs` are the teacher's own probabilities of those ids; the loss renormalises them over
the subset (`losses.sparse_distill_loss`), so with k = vocab it is the full cross-entropy.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from openmedgemma.errors import DataError
from openmedgemma.train.losses import IGNORE, upcast

FORMAT = "openmedgemma-teacher-store"
MANIFEST = "store.json"


def select_teacher_targets(logits: torch.Tensor, k: int, selection: str = "sample",
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N, k] int64, probs [N, k] fp32) from teacher logits [N, V]."""
    probs = torch.softmax(upcast(logits), dim=-1)
    k = min(k, probs.shape[-1])
    if selection == "topk":
        values, indices = torch.topk(probs, k, dim=-1)
        return indices, values
    if selection == "sample":
        indices = torch.multinomial(probs, k, replacement=False, generator=generator)
        return indices, probs.gather(-1, indices)
    raise ValueError(f"selection must be 'sample' or 'topk', got {selection!r}")


@torch.no_grad()
def write_teacher_store(out_dir: str | os.PathLike, teacher, collator, examples: Sequence, *, k: int = 256,
                        selection: str = "sample", batch_size: int = 4, shard_sequences: int = 4096,
                        seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> Path:
    """Run `teacher` (a MedGemma) over `examples` formatted by `collator` (an `LMCollator`, text only) and
    write the sparse teacher distribution of every labelled token. The folder is written under a temporary
    name and renamed when complete."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new folder for the teacher store")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    teacher.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vocab = teacher.config.text.vocab_size
    shards, buffer, n_seq, n_targets = [], [], 0, 0
    iterator = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="teacher", unit="batch")
    for start in iterator:
        chunk = examples[start : start + batch_size]
        if any(ex.images for ex in chunk):
            raise DataError(f"{chunk[0].source}: teacher stores hold text only; this example has images")
        batch = collator(chunk)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        hidden = teacher.hidden_states(ids.to(device), attention_mask=mask.to(device))
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            targets = [t for t in range(1, n) if labels[i, t] != IGNORE]
            pos = torch.tensor([t - 1 for t in targets], dtype=torch.long, device=hidden.device)
            logits = teacher.logits(hidden[i, pos])
            idx, p = select_teacher_targets(logits.cpu(), k, selection, generator)
            buffer.append((ids[i, :n], labels[i, :n], idx, p))
            n_targets += len(targets)
        if len(buffer) >= shard_sequences:
            shards.append(_write_shard(tmp, len(shards), buffer))
            n_seq += len(buffer)
            buffer = []
    if buffer:
        shards.append(_write_shard(tmp, len(shards), buffer))
        n_seq += len(buffer)
    manifest = {
        "format": FORMAT, "version": 1, "k": int(min(k, vocab)), "selection": selection,
        "vocab_size": int(vocab), "sequences": n_seq, "targets": n_targets, "shards": shards,
        "teacher": str(getattr(teacher, "source", "")), "seed": seed,
    }  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def _write_shard(folder: Path, index: int, buffer: list) -> dict:
    from safetensors.torch import save_file

    ids = torch.cat([b[0] for b in buffer]).to(torch.int32)
    labels = torch.cat([b[1] for b in buffer]).to(torch.int32)
    lengths = torch.tensor([0] + [len(b[0]) for b in buffer])
    counts = torch.tensor([0] + [len(b[2]) for b in buffer])
    name = f"teacher-{index:05d}.safetensors"
    save_file({
        "input_ids": ids, "labels": labels, "seq_offsets": lengths.cumsum(0),
        "indices": torch.cat([b[2] for b in buffer]).to(torch.int32).contiguous(),
        "probs": torch.cat([b[3] for b in buffer]).to(torch.float32).contiguous(),
        "target_offsets": counts.cumsum(0),
    }, str(folder / name))  # fmt: skip
    return {"file": name, "sequences": len(buffer)}


class TeacherStore:
    """Read a teacher store lazily (memory-mapped). store[i] -> dict of input_ids, labels, indices, probs."""

    def __init__(self, path: str | os.PathLike, _limit: int | None = None):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise DataError(f"{self.path}: not a teacher store (no {MANIFEST}); write one with write_teacher_store")
        try:
            self.manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{manifest_file}: unreadable: {err}") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_file}: format is {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.k = int(self.manifest["k"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._files, self._starts = [], []
        total = 0
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise DataError(f"{file}: shard listed in {manifest_file} is missing")
            self._files.append(file)
            self._starts.append(total)
            total += int(shard["sequences"])
        self._len = total if _limit is None else min(total, _limit)
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return self._len

    def head(self, n: int) -> TeacherStore:
        return TeacherStore(self.path, n)

    def _shard(self, s: int) -> dict:
        if s not in self._open:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self._files[s]), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise DataError(f"{self._files[s]}: not a readable safetensors shard: {err}") from None
            self._open[s] = {"f": handle, "seq": handle.get_tensor("seq_offsets"), "tgt": handle.get_tensor("target_offsets")}
        return self._open[s]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._len:
            raise IndexError(i)
        s = max(j for j, start in enumerate(self._starts) if start <= i)
        shard, local = self._shard(s), i - self._starts[s]
        a, b = int(shard["seq"][local]), int(shard["seq"][local + 1])
        c, d = int(shard["tgt"][local]), int(shard["tgt"][local + 1])
        f = shard["f"]
        item = {
            "input_ids": f.get_slice("input_ids")[a:b].long(), "labels": f.get_slice("labels")[a:b].long(),
            "indices": f.get_slice("indices")[c:d].long(), "probs": f.get_slice("probs")[c:d].float(),
        }  # fmt: skip
        n_targets = int(((item["labels"] != IGNORE) & (torch.arange(b - a) >= 1)).sum())
        if n_targets != d - c:
            raise DataError(f"{self._files[s]}: sequence {local} has {n_targets} labelled tokens but {d - c} teacher rows")
        return item


class DistillCollator:
    """Store items -> {input_ids, attention_mask, labels [B, T], teacher_indices [B, T, k], teacher_probs}, the
    teacher rows placed at the positions that predict each labelled token (zero weight elsewhere)."""

    def __init__(self, pad_id: int, vocab_size: int, max_length: int = 0):
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.max_length = max_length

    def __call__(self, items: list[dict]) -> dict:
        t = max(len(it["input_ids"]) for it in items)
        if self.max_length:
            t = min(t, self.max_length)
        k = max(it["indices"].shape[1] for it in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        t_idx = torch.zeros((b, t, k), dtype=torch.long)
        t_p = torch.zeros((b, t, k), dtype=torch.float32)
        for i, it in enumerate(items):
            if it["indices"].numel() and int(it["indices"].max()) >= self.vocab_size:
                raise DataError(f"teacher store indices reach {int(it['indices'].max())}, beyond the student's "
                                f"vocabulary of {self.vocab_size}: teacher and student must share the tokenizer")  # fmt: skip
            n = min(len(it["input_ids"]), t)
            ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"][:n], it["labels"][:n], 1
            targets = [p for p in range(1, len(it["input_ids"])) if it["labels"][p] != IGNORE]
            for row, p in enumerate(targets):
                if p < n:
                    kk = it["indices"].shape[1]
                    t_idx[i, p - 1, :kk], t_p[i, p - 1, :kk] = it["indices"][row], it["probs"][row]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "teacher_indices": t_idx,
                "teacher_probs": t_p, "pixel_values": None, "n_tokens": int(mask.sum())}  # fmt: skip
