"""The five training stages of the MedGemma recipe (spec §3), each a model + data + loss for the `Trainer`.

| stage    | model     | data                                   | loss                                        |
|----------|-----------|----------------------------------------|---------------------------------------------|
| siglip   | MedSigLIP | image-caption pairs                    | sigmoid loss                                |
| pretrain | MedGemma  | captions / text, `<bos>` text `<eos>`   | next-token CE on the text                   |
| sft      | MedGemma  | QA pairs in the chat template          | next-token CE on the answer tokens only     |
| distill  | MedGemma  | teacher stores (sparse teacher logits) | CE on the stored teacher subset             |
| rl       | MedGemma  | prompts + verifiable answers           | GRPO with group-normalised advantages       |

A stage gives the trainer: `module` (the nn.Module DDP / FSDP wrap, whose forward returns (loss sum, count,
stats)), `next_batches(step, draw)` (this rank's micro-batches for one optimizer step), `units(batch)` (the
count the loss sum is divided by), `eval_batches()`, `save_final(folder)` and `state_dict()`.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from openmedgemma.errors import ConfigError, DataError
from openmedgemma.train import distributed as D
from openmedgemma.train.collate import ImageCache, LMCollator, SiglipCollator
from openmedgemma.train.config import TrainConfig
from openmedgemma.train.data import load_source, source_args
from openmedgemma.train.losses import IGNORE, group_advantages, shift_labels
from openmedgemma.train.modeling import (
    DistillModule,
    GRPOModule,
    LMModule,
    SiglipModule,
    build_model,
    compile_blocks,
    freeze_parts,
    set_gradient_checkpointing,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Stage:
    name = ""
    model_kind = "medgemma"

    def __init__(self, cfg: TrainConfig, device: torch.device, info: D.DistInfo, data_dir: Path | None = None):
        self.cfg = cfg
        self.device = device
        self.info = info
        self.data_dir = data_dir
        self.peft = None
        self.model: nn.Module | None = None
        self.module: nn.Module | None = None
        self.wrapped: nn.Module | None = None  # set by the trainer (DDP / FSDP / the module itself)
        self.sources: list = []
        self.weights: list[float] = []
        self.eval_examples: list = []
        self.cache = ImageCache(cfg.data.cache_mb)

    # ------------------------------------------------------------------ building

    def setup(self) -> None:
        self.model = self.build_model()
        self.sources = [self.load(s) for s in self.cfg.data.sources]
        self.weights = [s.weight for s in self.cfg.data.sources]
        self.eval_examples = [ex for s in self.cfg.eval.sources for ex in self.load(s)]
        self.module = self.build_module()

    def load(self, s):
        return self.check_source(load_source(*source_args(s, self.data_dir)), s)

    def check_source(self, examples, s):
        return examples

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg.model, self.model_kind)
        if cfg.model.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        model.to(self.device)
        if cfg.lora.enabled:
            from openmedgemma.train.lora import apply_lora, unwrap

            if self.info.strategy == "fsdp":
                raise ConfigError(f"{cfg.source_file}: lora with distributed.strategy = 'fsdp' is not supported; "
                                  "use ddp (adapters are small)")  # fmt: skip
            lo = cfg.lora
            self.peft = apply_lora(model, lo.r, lo.alpha, lo.dropout, lo.targets, lo.parts, lo.quantize)
            model = unwrap(self.peft)
        freeze_parts(model, cfg.freeze)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"{cfg.source_file}: nothing left to train (freeze = {cfg.freeze})")
        if cfg.model.compile:
            compile_blocks(model)
        return model

    def build_module(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks (FSDP shards each on its own)."""
        out = []
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList):
                out.extend(module)
        return out

    @property
    def find_unused_parameters(self) -> bool:
        return False

    # ------------------------------------------------------------------ batches

    def example(self, source: int, index: int):
        return self.sources[source][index]

    def local_slice(self, items: list) -> list:
        n, world = len(items), self.info.world
        per = n // world
        return items[self.info.rank * per : (self.info.rank + 1) * per]

    def micro_batch_size(self) -> int:
        per_rank = self.cfg.train.batch_size // self.info.world
        return self.cfg.train.micro_batch_size or per_rank

    def next_batches(self, step: int, draw) -> tuple[list[dict], dict]:
        """This rank's micro-batches for one optimizer step. draw(n) -> the next n global (source, index) pairs."""
        examples = [self.example(s, i) for s, i in self.local_slice(draw(self.cfg.train.batch_size))]
        return [self.collate(c) for c in chunks(examples, self.micro_batch_size())], {}

    def collate(self, examples: list) -> dict:
        return self.collator(examples)

    def units(self, batch: dict) -> float:
        return float((shift_labels(batch["labels"]) != IGNORE).sum())

    def eval_batches(self) -> list[dict]:
        size = self.cfg.eval.batch_size
        batches = [self.collate(c) for c in chunks(self.eval_examples, size)]
        return batches[: self.cfg.eval.max_batches] if self.cfg.eval.max_batches else batches

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ output

    def full_state_dict(self) -> dict:
        """The model's full (unsharded) state dict on CPU; all ranks must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def save_final(self, out: Path) -> dict:
        """Write the trained model in HF layout (and the LoRA adapter); all ranks call it, rank 0 writes."""
        written = {}
        if self.peft is not None:
            if self.info.is_main:
                written.update(self._save_lora(out))
            D.barrier(self.info)
            return written
        state = self.full_state_dict()
        if self.info.is_main:
            from openmedgemma.model.pretrained import params_on_meta

            with params_on_meta():
                clone = type(self.model)(self.model.config)
            clone.load_state_dict(state, strict=True, assign=True)
            clone.save_pretrained(out / "final")
            self.copy_tokenizer(out / "final")
            written["final"] = str(out / "final")
        D.barrier(self.info)
        return written

    def _save_lora(self, out: Path) -> dict:
        from openmedgemma.train.lora import merge_adapter, merged_checkpoint, save_adapter

        written = {"adapter": str(save_adapter(self.peft, out / "adapter"))}
        if self.cfg.lora.save_merged:
            if self.cfg.lora.quantize != "none":
                if not self.cfg.model.path:
                    raise ConfigError("QLoRA with a fresh model (model.config) has no full-precision base to merge into")
                merged_checkpoint(self.cfg.model.path, out / "adapter", out / "final", dtype=self.cfg.model.dtype)
            else:
                merged = merge_adapter(self.peft)
                merged.save_pretrained(out / "final")
            self.copy_tokenizer(out / "final")
            written["final"] = str(out / "final")
        return written

    def tokenizer_source(self) -> Path | None:
        ref = self.cfg.model.tokenizer or self.cfg.model.path
        return Path(ref).expanduser() if ref else None

    def copy_tokenizer(self, folder: Path) -> None:
        src = self.tokenizer_source()
        if src is None:
            return
        if src.is_file():
            shutil.copy2(src, folder / src.name)
            return
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, folder / name)


# ----------------------------------------------------------------------------- MedGemma stages


class _LMStage(Stage):
    mode = "chat"

    def setup(self) -> None:
        from openmedgemma.tokenizer import Tokenizer

        src = self.tokenizer_source()
        if src is None:
            raise ConfigError(f"{self.cfg.source_file}: [model] config = ... needs tokenizer = (a tokenizer folder)")
        self.tok = Tokenizer.from_pretrained(src)
        super().setup()
        self._check_tokenizer()

    def build_collator(self) -> LMCollator:
        mc = self.model.config
        size = self.cfg.data.image_size or (mc.vision.image_size if mc.is_multimodal else 0)
        return LMCollator(self.tok, mode=self.mode, image_seq_length=mc.mm_tokens_per_image, image_size=size,
                          max_length=self.cfg.data.max_length, multimodal=mc.is_multimodal, cache=self.cache)  # fmt: skip

    def _check_tokenizer(self) -> None:
        mc, tok = self.model.config, self.tok
        limit = mc.text.vocab_size
        if mc.is_multimodal:
            pairs = [("<start_of_image>", tok.boi_id, mc.boi_token_index), ("<end_of_image>", tok.eoi_id, mc.eoi_token_index),
                     ("<image_soft_token>", tok.image_token_id, mc.image_token_index)]  # fmt: skip
            bad = [f"{name} is {a} in the tokenizer but {b} in the model" for name, a, b in pairs if a != b]
            if bad:
                raise ConfigError(f"{tok.source}: tokenizer and model disagree: {'; '.join(bad)}")
        too_big = tok.vocab_size - (1 if mc.is_multimodal and mc.image_token_index >= limit else 0)
        if too_big > limit:
            raise ConfigError(f"{tok.source}: the tokenizer has {tok.vocab_size} ids, more than the model's vocabulary ({limit})")

    @property
    def find_unused_parameters(self) -> bool:
        """A micro-batch without images leaves a trainable vision tower unused (DDP must be told)."""
        if not self.model.config.is_multimodal or not any(p.requires_grad for p in self.model.vision_tower.parameters()):
            return False
        return any(not ex.images for source in self.sources if isinstance(source, list) for ex in source)

    def build_module(self):
        self.collator = self.build_collator()
        return LMModule(self.model)


class SFTStage(_LMStage):
    name = "sft"

    def check_source(self, examples, s):
        if s.format == "text":
            raise ConfigError(f"{self.cfg.source_file}: sft trains on QA pairs; source {s.kind}:{s.split} has format 'text' (use pretrain)")
        return examples


class PretrainStage(_LMStage):
    name = "pretrain"
    mode = "plain"


class DistillStage(_LMStage):
    name = "distill"

    def build_module(self):
        for store in self.sources:
            if store.vocab_size > self.model.config.text.vocab_size:
                raise DataError(f"{store.path}: teacher vocabulary {store.vocab_size} is larger than the student's "
                                f"{self.model.config.text.vocab_size}; teacher and student must share the tokenizer")  # fmt: skip
        from openmedgemma.train.distill import DistillCollator

        self.collator = DistillCollator(self.tok.pad_id, self.model.config.text.vocab_size, self.cfg.data.max_length)
        return DistillModule(self.model, self.cfg.distill.hard_label_weight)

    @property
    def find_unused_parameters(self) -> bool:  # teacher stores are text only
        return self.model.config.is_multimodal and any(p.requires_grad for p in self.model.vision_tower.parameters())


class RLStage(_LMStage):
    """GRPO. Each rollout batch (train.batch_size prompts x rl.group_size completions) serves rl.epochs
    optimizer steps; the buffer is part of the checkpoint, so a resumed run replays it exactly."""

    name = "rl"

    def __init__(self, *args, rollout_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_fn = rollout_fn
        self._batches: list[dict] = []
        self._stats: dict = {}

    def build_module(self):
        from openmedgemma.train.rewards import CombinedReward

        r = self.cfg.rl
        self.collator = self.build_collator()
        self.reward = CombinedReward(r.rewards)
        self.ref_model = None
        if r.kl_coef > 0 and self.peft is None:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        return GRPOModule(self.model, r.clip_eps, r.kl_coef, r.loss_agg)

    def units(self, batch: dict) -> float:
        if "completion_mask" not in batch:  # evaluation batches (answer NLL)
            return super().units(batch)
        mask = shift_labels(batch["completion_mask"].long()) > 0
        return float(mask.sum() if self.cfg.rl.loss_agg == "token" else (mask.sum(-1) > 0).sum())

    def _rollout_function(self):
        if self.rollout_fn is not None:
            return self.rollout_fn
        r = self.cfg.rl
        from openmedgemma.train.rollout import engine_rollout, sample_completions

        if r.rollout == "engine" or (r.rollout == "auto" and self.info.strategy != "fsdp"):
            return engine_rollout(self.model, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                  top_k=r.top_k, stop_ids=self.tok.stop_ids, suppress_ids=self.suppressed_ids())  # fmt: skip
        sharded = self.info.strategy == "fsdp"
        features: dict = {}

        def forward_logits(ids, mask, pv):
            if sharded:  # every rank must go through the sharded root's forward
                return self.wrapped(input_ids=ids, attention_mask=mask, pixel_values=pv, mode="logits")
            if pv is not None and features.get("key") is not pv:  # the images are encoded once per rollout
                features.update(key=pv, value=self.model.image_features(pv))
            return self.module(input_ids=ids, attention_mask=mask, image_features=features.get("value") if pv is not None
                               else None, mode="logits")  # fmt: skip

        def rollout(prompts, pixel_values, n):
            return sample_completions(forward_logits, prompts, pixel_values, n, max_new_tokens=r.max_new_tokens,
                                      stop_ids=self.tok.stop_ids, pad_id=self.tok.pad_id, temperature=r.temperature,
                                      top_k=r.top_k, device=self.device, early_stop=not sharded,
                                      suppress_ids=self.suppressed_ids())  # fmt: skip

        return rollout

    def suppressed_ids(self) -> list[int]:
        """Ids a completion must never hold: image soft token and markers, pad, bos (those inside the vocabulary)."""
        tok, vocab = self.tok, self.model.config.text.vocab_size
        return [i for i in (tok.image_token_id, tok.boi_id, tok.eoi_id, tok.pad_id, tok.bos_id) if i < vocab]

    @torch.no_grad()
    def _logp(self, model_call, batch: dict) -> torch.Tensor:
        return model_call(input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device),
                          pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(self.device),
                          completion_mask=batch["completion_mask"].to(self.device), mode="logp")  # fmt: skip

    def next_batches(self, step: int, draw) -> tuple[list[dict], dict]:
        r = self.cfg.rl
        if step % r.epochs == 0 or not self._batches:
            examples = [self.example(s, i) for s, i in self.local_slice(draw(self.cfg.train.batch_size))]
            self._batches, self._stats = self._rollouts(examples)
        return self._batches, dict(self._stats)

    def _rollouts(self, examples: list) -> tuple[list[dict], dict]:
        r, tok, g = self.cfg.rl, self.tok, self.cfg.rl.group_size
        prompts = [self.collator.prompt_ids(ex) for ex in examples]
        pixels = [self.cache.pixel_values(list(ex.images), self.collator.image_size) if ex.images else None
                  for ex in examples]  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            completions = self._rollout_function()(prompts, pixels, g)
        if len(completions) != len(prompts) * g:
            raise RuntimeError(f"rollout returned {len(completions)} completions for {len(prompts)} prompts x {g}")
        stops = set(tok.stop_ids)
        rewards = []
        for j, completion in enumerate(completions):
            text = tok.decode([t for t in completion if t not in stops])
            rewards.append(float(self.reward(text, examples[j // g])))
        rewards_t = torch.tensor(rewards)
        advantages = group_advantages(rewards_t, g)
        batches = []
        for start in range(0, len(prompts), self.micro_batch_size()):
            idx = range(start, min(start + self.micro_batch_size(), len(prompts)))
            rows = [(p, completions[p * g + k], advantages[p * g + k]) for p in idx for k in range(g)]
            batch = self._pack(rows, prompts, pixels)
            if r.epochs > 1:
                batch["old_logp"] = self._logp(self.wrapped, batch).cpu()
            if r.kl_coef > 0:
                if self.peft is not None:
                    with self.peft.disable_adapter():
                        batch["ref_logp"] = self._logp(self.module, batch).cpu()
                else:
                    batch["ref_logp"] = self._logp(LMModule(self.ref_model), batch).cpu()
            batches.append(batch)
        self.model.train(was_training)
        lengths = [len(c) for c in completions]
        stats = {"reward": float(rewards_t.mean()), "reward_std": float(rewards_t.std(unbiased=False)),
                 "completion_len": sum(lengths) / len(lengths),
                 "stopped": sum(bool(c) and c[-1] in stops for c in completions) / len(completions)}  # fmt: skip
        return batches, stats

    def _pack(self, rows, prompts, pixels) -> dict:
        seqs = [prompts[p] + list(c) for p, c, _ in rows]
        t = max(len(s) for s in seqs)
        b = len(rows)
        ids = torch.full((b, t), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        comp = torch.zeros((b, t), dtype=torch.long)
        for i, ((p, c, _), s) in enumerate(zip(rows, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            comp[i, len(prompts[p]) : len(s)] = 1
        images = [pixels[p] for p, _, _ in rows if pixels[p] is not None]
        return {"input_ids": ids, "attention_mask": mask, "completion_mask": comp,
                "advantages": torch.stack([a for _, _, a in rows]).float(),
                "pixel_values": torch.cat(images) if images else None, "n_tokens": int(mask.sum())}  # fmt: skip

    def state_dict(self) -> dict:
        if self.cfg.rl.epochs == 1:  # every step samples afresh: nothing to replay
            return {}
        return {"batches": self._batches, "stats": self._stats}

    def load_state_dict(self, state: dict) -> None:
        self._batches, self._stats = state.get("batches", []), state.get("stats", {})


# ----------------------------------------------------------------------------- SigLIP


class SiglipStage(Stage):
    name = "siglip"
    model_kind = "medsiglip"

    def setup(self) -> None:
        super().setup()
        from openmedgemma.tokenizer.siglip import SiglipTextTokenizer

        folder = self.tokenizer_folder()
        if folder is None:
            raise ConfigError(f"{self.cfg.source_file}: [model] config = ... needs tokenizer = (a folder with spiece.model)")
        s, mc = self.cfg.siglip, self.model.config
        if s.text_length != mc.text.max_position_embeddings:
            # the text tower pools the last position: texts must be padded exactly as at inference
            raise ConfigError(f"{self.cfg.source_file}: siglip.text_length = {s.text_length} but the text tower has "
                              f"{mc.text.max_position_embeddings} positions and pools the last one; make them equal")  # fmt: skip
        tok = SiglipTextTokenizer.from_pretrained(folder, max_length=s.text_length)
        if tok.vocab_size > mc.text.vocab_size:
            raise ConfigError(f"{tok.source}: {tok.vocab_size} pieces, more than the text tower's vocabulary ({mc.text.vocab_size})")
        if s.pad_id >= 0:
            tok.pad_id = s.pad_id
        size = self.cfg.data.image_size or mc.vision.image_size
        self.collator = SiglipCollator(tok, image_size=size, cache=self.cache)

    def check_source(self, examples, s):
        bad = next((ex for ex in examples if len(ex.images) != 1), None)
        if bad is not None or s.format == "qa" and s.kind != "image_text":
            raise ConfigError(f"{self.cfg.source_file}: siglip trains on image-caption pairs; source {s.kind}:{s.split} "
                              "needs format = 'caption' (one image and its text per example)")  # fmt: skip
        return examples

    def build_module(self):
        s = self.cfg.siglip
        return SiglipModule(self.model, s.chunk_size, s.gather, s.duplicate_positives)

    def units(self, batch: dict) -> float:
        return 1.0

    def next_batches(self, step: int, draw):
        batches, stats = super().next_batches(step, draw)
        if self.info.enabled and self.cfg.siglip.gather and len({b["input_ids"].shape[0] for b in batches}) > 1:
            raise ConfigError("siglip: every micro-batch must have the same size when gathering across ranks")
        return batches, stats

    def tokenizer_folder(self) -> Path | None:
        """The folder holding spiece.model (model.tokenizer may name a file in it)."""
        src = self.tokenizer_source()
        return src.parent if src is not None and src.is_file() else src

    def copy_tokenizer(self, folder: Path) -> None:
        src = self.tokenizer_folder()
        for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
            if src is not None and (src / name).is_file():
                shutil.copy2(src / name, folder / name)


STAGE_CLASSES = {"siglip": SiglipStage, "pretrain": PretrainStage, "sft": SFTStage, "distill": DistillStage, "rl": RLStage}
