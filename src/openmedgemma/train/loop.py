"""The training loop: AdamW, warmup + linear / cosine decay, gradient accumulation and clipping, bf16 autocast,
checkpoints with exact resume, a JSONL metrics log, a progress bar and periodic evaluation.

    trainer = Trainer(load_config("sft.toml", "sft"))
    summary = trainer.run()

One optimizer step: the mixture gives `train.batch_size` examples (the same on every rank); each rank takes its
slice and splits it in micro-batches; the loss sums of all micro-batches of all ranks are divided by their
total count (tokens with a label, for LM losses), so accumulation and data parallelism do not change the
objective. Metrics go to `<output_dir>/metrics.jsonl`, one JSON object per logged step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openmedgemma.errors import CheckpointError, ConfigError
from openmedgemma.train import checkpointing, resume
from openmedgemma.train import distributed as D
from openmedgemma.train.config import TrainConfig
from openmedgemma.train.data import MixtureSampler
from openmedgemma.train.stages import STAGE_CLASSES


@dataclass
class Schedule:
    """lr multiplier at a step: linear warmup from 0, then constant, linear or cosine decay to min_ratio."""

    warmup: int
    total: int
    kind: str = "linear"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def build_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, logit scale / bias)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class Trainer:
    """Runs one stage of `cfg`. `rollout_fn` replaces the RL sampler (see rollout.py); `eval_hooks` are called
    as hook(trainer, step) -> dict at each evaluation and their results logged."""

    def __init__(self, cfg: TrainConfig, *, resume: str | os.PathLike | None = None, data_dir: str | None = None,
                 rollout_fn: Callable | None = None, eval_hooks: tuple = ()):
        self.cfg = cfg
        self.resume = resume
        self.data_dir = Path(data_dir or cfg.data.data_dir or ".").expanduser()
        self.rollout_fn = rollout_fn
        self.eval_hooks = list(eval_hooks)
        self.out = Path(cfg.output_dir).expanduser()
        self.history: list[dict] = []
        self.resume_note = ""  # what a resume with a changed config changed (said on stderr too)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        self.info = D.init(cfg.distributed.strategy, cfg.distributed.backend, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        world = self.info.world
        t = cfg.train
        if t.batch_size % world:
            raise ConfigError(f"{cfg.source_file}: train.batch_size = {t.batch_size} is not divisible by the {world} processes")
        micro = t.micro_batch_size or t.batch_size // world
        if (t.batch_size // world) % micro:
            raise ConfigError(f"{cfg.source_file}: train.micro_batch_size = {micro} does not divide the "
                              f"{t.batch_size // world} examples each process gets per step")  # fmt: skip
        if self.resume is None and self.info.is_main and (self.out / "metrics.jsonl").exists():
            raise CheckpointError(f"{self.out}: already holds a run (metrics.jsonl); pass --resume {self.out} to "
                                  "continue it, or choose another output_dir")  # fmt: skip
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        kwargs = {"rollout_fn": self.rollout_fn} if cfg.stage == "rl" else {}
        self.stage = STAGE_CLASSES[cfg.stage](cfg, self.device, self.info, self.data_dir, **kwargs)
        self.stage.setup()
        self.module = D.wrap(self.stage.module, self.info, self.device, self.stage.blocks(),
                             find_unused=self.stage.find_unused_parameters)  # fmt: skip
        self.stage.wrapped = self.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]  # what gradient clipping sees
        self.optimizer = build_optimizer(self.module, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        self.sampler = MixtureSampler([len(s) for s in self.stage.sources], self.stage.weights, cfg.seed)
        torch.manual_seed(cfg.seed + 1 + self.info.rank)  # training randomness (dropout, rollouts) per rank
        self.step = 0
        if self.resume is not None:
            self._resume(Path(self.resume).expanduser())
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        precision = t.precision
        if precision == "auto":
            precision = "bf16-autocast" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision

    def _schedule(self) -> Schedule:
        o, steps = self.cfg.optim, self.cfg.train.steps
        return Schedule(o.warmup_steps or int(o.warmup_ratio * steps), steps, o.schedule, o.min_lr_ratio)

    def _resume(self, path: Path) -> None:
        folder = checkpointing.find_checkpoint(path)
        changes = resume.check(folder, checkpointing.saved_config(folder), self.cfg.to_dict())  # before any loading
        state = checkpointing.load(folder, self.module, self.optimizer, self.info)
        if state.get("stage_name") != self.cfg.stage:
            raise CheckpointError(f"{folder}: a {state.get('stage_name')!r} checkpoint cannot resume a {self.cfg.stage!r} run")
        self.scheduler.load_state_dict(state["scheduler"])
        if changes:
            self._apply_changes(int(state["step"]), changes)
        self.sampler.load_state_dict(state["sampler"])
        self.stage.load_state_dict(state.get("stage", {}))
        self.step = int(state["step"])
        self.history = [h for h in state.get("history", []) if h["step"] <= self.step]
        if self.info.is_main:
            self._truncate_log(self.step)

    def _apply_changes(self, step: int, changes: list) -> None:
        """Allowed config changes on resume (see train/resume.py), said on stderr. train.steps or optim.*: the
        optimizer settings and the lr schedule come from the new config, positioned at `step` (the
        checkpoint's are those of the old run: its lr, its end)."""
        what = "applied as given"
        if resume.needs_new_schedule(changes):
            fresh = build_optimizer(self.module, self.cfg)
            for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
                group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule(), last_epoch=step - 1)
            what = (f"the optimizer settings and the lr schedule are rebuilt from the new config (next lr "
                    f"{self.optimizer.param_groups[0]['lr']:.3g})")  # fmt: skip
        self.resume_note = f"resuming at step {step} with {', '.join(resume.describe(c) for c in changes)}: {what}"
        if self.info.is_main:
            print(f"openmedgemma train: {self.resume_note}", file=sys.stderr)

    def _truncate_log(self, step: int) -> None:
        log = self.out / "metrics.jsonl"
        if not log.exists():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, log)

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.precision == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train_step(self) -> dict:
        batches, stats = self.stage.next_batches(self.step, self.sampler.take)
        units = sum(self.stage.units(b) for b in batches)
        tokens = sum(b.get("n_tokens", 0) for b in batches)
        units, tokens = D.all_reduce_sum([units, tokens], self.info, self.device)
        scale = self.info.world / max(units, 1.0)
        # float64 on the device: the same sum as adding Python floats, with one host sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, batch in enumerate(batches):
            batch = self._to_device(batch)
            with D.no_sync(self.module, self.info, last=j == len(batches) - 1), self._autocast():
                loss, _, extra = self.module(**batch)
                (loss * scale).backward()
            loss_sum += loss.detach().double()
            for k, v in extra.items():
                stats[k] = stats.get(k, 0.0) + v / len(batches)
        max_norm = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_total,) = D.all_reduce_sum([float(loss_sum)], self.info, self.device)
        return {"loss": loss_total / max(units, 1.0), "lr": lr, "grad_norm": float(norm), "tokens": int(tokens),
                "units": units, **stats}  # fmt: skip

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        metrics = {}
        batches = self.stage.eval_batches() if self.stage.eval_examples else []
        if batches:
            self.module.eval()
            total, count = 0.0, 0.0
            for batch in batches:
                with self._autocast():
                    loss, _, _ = self.module(**self._to_device(batch))
                total += float(loss)
                count += self.stage.units(batch)
            self.module.train()
            metrics["eval_loss"] = total / max(count, 1.0)
        for hook in self.eval_hooks:
            metrics.update(hook(self, self.step) or {})
        return metrics

    # ------------------------------------------------------------------ run

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _checkpoint(self) -> None:
        state = {"stage_name": self.cfg.stage, "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "stage": self.stage.state_dict(),
                 "history": self.history, "config": self.cfg.to_dict()}  # fmt: skip
        checkpointing.save(self.out, self.step, self.module, self.optimizer, state, self.info,
                           self.cfg.train.keep_checkpoints)  # fmt: skip

    def run(self) -> dict:
        """Train to train.steps; returns {"history", "outputs"}."""
        from tqdm import tqdm

        self.setup()
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.info.is_main),
                   desc=f"{self.cfg.stage}", dynamic_ncols=True, unit="step")  # fmt: skip
        start, first_step = time.perf_counter(), self.step
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.step += 1
                dt = time.perf_counter() - t0
                record = {"step": self.step, **metrics, "step_s": dt, "tokens_per_s": metrics["tokens"] / dt,
                          "elapsed_s": time.perf_counter() - start}  # fmt: skip
                if t.eval_every and self.step % t.eval_every == 0:
                    record.update(self.evaluate())
                if self.step % t.log_every == 0 or self.step == t.steps or "eval_loss" in record:
                    self._log(record)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
                bar.update(1)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self._checkpoint()
            bar.close()
            if t.checkpoint_every and self.step > first_step:
                self._checkpoint()
            outputs = self.stage.save_final(self.out)
        finally:
            bar.close()
            D.shutdown(self.info)
        return {"history": self.history, "outputs": outputs}
