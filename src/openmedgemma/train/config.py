"""Training configs: TOML files validated into dataclasses.

Every section is a dataclass; `load_config(path)` reads the file, rejects unknown keys (naming the key,
the section, the file and the keys allowed there), checks each value's type and allowed values, then
the ranges. Nothing here imports torch, so the CLI can validate a config instantly.

    stage = "sft"
    seed = 0
    output_dir = "runs/vqa-rad-lora"

    [model]
    path = "checkpoints/medgemma-4b-it"

    [[data.sources]]
    kind = "vqa_rad"
    path = "vqa_rad"
    split = "train"

    [optim]
    lr = 2e-4

    [train]
    steps = 200
    batch_size = 16

    [lora]
    enabled = true
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openmedgemma.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STAGES = ("siglip", "pretrain", "sft", "distill", "rl")
# The linear layers of the official recipe's "all-linear": decoder attention + MLP, SigLIP attention + MLP.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2")
MEDGEMMA_PARTS = ("language_model", "vision_tower", "multi_modal_projector")
MEDSIGLIP_PARTS = ("vision_model", "text_model", "logit_scale", "logit_bias")


@dataclass
class ModelSection:
    """The model to train: a Hugging Face checkpoint folder (`path`), or a fresh model of a named / file config."""

    path: str = ""  # checkpoint folder (MedGemma or MedSigLIP, HF layout)
    config: str = ""  # instead of path: a registry name ("4b") or a config.json, randomly initialised
    tokenizer: str = ""  # tokenizer folder or tokenizer.json; default: the checkpoint folder
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights' dtype while training
    init_std: float = 0.02  # std of the random init (config = ...)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block


@dataclass
class SourceSection:
    """One data source of the mixture."""

    kind: Literal["vqa_rad", "pneumonia_mnist", "mcq", "pubmedqa", "image_text", "teacher_store"] = "vqa_rad"
    path: str = ""  # file or folder; relative paths resolve against data.data_dir
    split: str = "train"
    split_scheme: Literal["balanced", "official"] = "balanced"  # vqa_rad only
    # qa: prompt -> answer; dialogue: several questions about one image (vqa_rad); caption: image -> text; text: plain
    format: Literal["qa", "dialogue", "caption", "text"] = "qa"
    weight: float = 1.0  # share of the mixture (normalised over the sources)
    limit: int = 0  # keep the first N examples (0: all)
    name: str = ""  # label in logs (default: kind:split)


@dataclass
class DataSection:
    data_dir: str = ""  # root for relative source paths (the CLI's --data-dir overrides it)
    sources: list[SourceSection] = field(default_factory=list)
    max_length: int = 1024  # tokens per sequence; longer ones are cut at the right (never inside an image)
    image_size: int = 0  # 0: the model's own input size
    cache_mb: int = 1024  # preprocessed images kept in memory, in MB (0: none; one 896 px image is 9.2 MB)


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0 (the official notebook: 0.03)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping (the official notebook: 0.3)


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per optimizer step, all ranks together (RL: prompts per step)
    micro_batch_size: int = 0  # examples per forward on one rank (0: batch_size / world size)
    precision: Literal["auto", "fp32", "bf16-autocast"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    log_every: int = 1
    eval_every: int = 0  # 0: no periodic evaluation
    checkpoint_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    parts: list[str] = field(default_factory=list)  # restrict adapters to these parts (empty: all)
    quantize: Literal["none", "nf4"] = "none"  # nf4: QLoRA, the frozen base in 4-bit (bitsandbytes)
    save_merged: bool = True  # also write the merged full model in HF layout


@dataclass
class DistributedSection:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: ddp when launched by torchrun
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class SiglipSection:
    text_length: int = 64  # MedSigLIP pads text to 64 tokens (must equal the text tower's positions)
    chunk_size: int = 0  # >0: the chunked sigmoid loss, this many texts at a time
    pad_id: int = -1  # -1: the tokenizer's pad (SigLIP pads with </s>)
    gather: bool = True  # distributed: score each image against every rank's texts
    duplicate_positives: bool = True  # a caption repeated in the batch (or one class's captions) is positive for all their images


@dataclass
class DistillSection:
    hard_label_weight: float = 0.0  # adds weight x cross-entropy on the stored tokens


@dataclass
class RLSection:
    group_size: int = 8  # completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0: KL to the starting model (k3 estimator)
    epochs: int = 1  # optimizer steps per rollout batch
    loss_agg: Literal["sequence", "token"] = "sequence"
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    rollout: Literal["auto", "engine", "simple"] = "auto"


@dataclass
class EvalSection:
    sources: list[SourceSection] = field(default_factory=list)
    max_batches: int = 0  # 0: the whole evaluation set
    batch_size: int = 8


@dataclass
class TrainConfig:
    stage: str = ""  # optional; must match the stage named on the command line
    seed: int = 0
    output_dir: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: list[str] = field(default_factory=list)  # parts kept frozen (see MEDGEMMA_PARTS / MEDSIGLIP_PARTS)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    siglip: SiglipSection = field(default_factory=SiglipSection)
    distill: DistillSection = field(default_factory=DistillSection)
    rl: RLSection = field(default_factory=RLSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source_file: str = field(default="<dict>", repr=False, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, stage: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a TOML config. `stage` (from the command line) must agree with the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return config_from_dict(raw, str(path), stage, overrides)


def config_from_dict(raw: dict, file: str = "<dict>", stage: str | None = None, overrides: dict | None = None) -> TrainConfig:
    raw = dict(raw)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = _build(TrainConfig, raw, file, "")
    cfg.source_file = file
    if stage is not None:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        if cfg.stage and cfg.stage != stage:
            raise ConfigError(f"{file}: stage = {cfg.stage!r} but the command asks for {stage!r}")
        cfg.stage = stage
    _validate(cfg, file)
    return cfg


def _section_name(prefix: str) -> str:
    return f"[{prefix[:-1]}]" if prefix else "the top level"


def _build(cls, raw: Any, file: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: {prefix[:-1] or 'the config'} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source_file"]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{file}: unknown key '{prefix}{key}'{hint}; allowed in {_section_name(prefix)}: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, file, prefix + key)
    return cls(**kwargs)


def _convert(hint, value, file: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, file, key + ".")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{file}: {key} = {value!r} is not allowed; use one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {key} must be a list, got {value!r}")
        return [_convert(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {key} must be a table, got {value!r}")
        return {str(k): _convert(args[1], v, file, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{file}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{file}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{file}: {key}: unsupported value {value!r}")  # pragma: no cover


def _validate(cfg: TrainConfig, file: str) -> None:
    def need(ok: bool, key: str, what: str, value):
        if not ok:
            raise ConfigError(f"{file}: {key} = {value!r}: {what}")

    m = cfg.model
    if not cfg.stage:
        raise ConfigError(f"{file}: no stage given (set stage = one of {', '.join(STAGES)}, or name it on the command line)")
    need(cfg.stage in STAGES, "stage", f"must be one of {', '.join(STAGES)}", cfg.stage)
    if bool(m.path) == bool(m.config):
        raise ConfigError(f"{file}: [model] needs exactly one of path (a checkpoint folder) or config (a fresh model)")
    need(m.init_std > 0, "model.init_std", "must be > 0", m.init_std)
    if not cfg.data.sources:
        raise ConfigError(f"{file}: no data: add at least one [[data.sources]] table")
    for i, s in enumerate(cfg.data.sources + cfg.eval.sources):
        where = f"data.sources[{i}]" if i < len(cfg.data.sources) else f"eval.sources[{i - len(cfg.data.sources)}]"
        need(bool(s.path), f"{where}.path", "a path to the dataset file or folder is required", s.path)
        need(s.weight > 0, f"{where}.weight", "must be > 0", s.weight)
        need(s.limit >= 0, f"{where}.limit", "must be >= 0", s.limit)
        need(s.format != "dialogue" or (cfg.stage == "sft" and s.kind == "vqa_rad"), f"{where}.format",
             "dialogue (several questions about one image) is for vqa_rad sources of the sft stage", s.format)
    for key, sources in (("data.sources", cfg.data.sources), ("eval.sources", cfg.eval.sources)):
        kinds = {s.kind for s in sources}  # data.sources is not empty (checked above); eval.sources may be
        if cfg.stage == "distill":
            need(kinds <= {"teacher_store"}, f"{key}.kind", "the distill stage trains and evaluates on teacher "
                 "stores only (kind = 'teacher_store'; write one with openmedgemma.train.distill.write_teacher_store)",
                 sorted(kinds))  # fmt: skip
        elif "teacher_store" in kinds:
            raise ConfigError(f"{file}: {key} kind = 'teacher_store' is only for the distill stage")
    d, o, t = cfg.data, cfg.optim, cfg.train
    need(d.max_length >= 8, "data.max_length", "must be >= 8", d.max_length)
    need(d.image_size >= 0, "data.image_size", "must be >= 0", d.image_size)
    need(d.cache_mb >= 0, "data.cache_mb", "must be >= 0", d.cache_mb)
    need(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)", o.betas)
    need(o.eps > 0, "optim.eps", "must be > 0", o.eps)
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)", o.warmup_ratio)
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    need(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)", o.max_grad_norm)
    need(t.steps >= 1, "train.steps", "must be >= 1", t.steps)
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    need(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0", t.micro_batch_size)
    need(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    for key in ("eval_every", "checkpoint_every"):
        need(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0: never)", getattr(t, key))
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", t.keep_checkpoints)
    need(t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda"), "train.device", "use auto, cpu, cuda or cuda:N", t.device)
    lo = cfg.lora
    need(lo.r >= 1, "lora.r", "must be >= 1", lo.r)
    need(lo.alpha >= 1, "lora.alpha", "must be >= 1", lo.alpha)
    need(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)", lo.dropout)
    need(bool(lo.targets), "lora.targets", "must name at least one layer", lo.targets)
    if lo.quantize != "none" and not lo.enabled:
        raise ConfigError(f"{file}: lora.quantize = {lo.quantize!r} needs lora.enabled = true (QLoRA trains adapters)")
    parts = MEDSIGLIP_PARTS if cfg.stage == "siglip" else MEDGEMMA_PARTS
    for key, values in (("freeze", cfg.freeze), ("lora.parts", lo.parts)):
        bad = [p for p in values if p not in parts]
        need(not bad, key, f"unknown part(s) {bad}; the {cfg.stage} model has {', '.join(parts)}", values)
    s = cfg.siglip
    need(s.text_length >= 1, "siglip.text_length", "must be >= 1", s.text_length)
    need(s.chunk_size >= 0, "siglip.chunk_size", "must be >= 0", s.chunk_size)
    need(cfg.distill.hard_label_weight >= 0, "distill.hard_label_weight", "must be >= 0", cfg.distill.hard_label_weight)
    r = cfg.rl
    need(r.group_size >= 2, "rl.group_size", "must be >= 2 (advantages are normalised within a group)", r.group_size)
    need(r.max_new_tokens >= 1, "rl.max_new_tokens", "must be >= 1", r.max_new_tokens)
    need(r.temperature > 0, "rl.temperature", "must be > 0 (rollouts are sampled)", r.temperature)
    need(r.top_k >= 0, "rl.top_k", "must be >= 0", r.top_k)
    need(0 < r.clip_eps < 1, "rl.clip_eps", "must be in (0, 1)", r.clip_eps)
    need(r.kl_coef >= 0, "rl.kl_coef", "must be >= 0", r.kl_coef)
    need(r.epochs >= 1, "rl.epochs", "must be >= 1", r.epochs)
    need(bool(r.rewards), "rl.rewards", "name at least one reward", r.rewards)
    if cfg.stage == "rl":
        from openmedgemma.train.rewards import check_reward_names

        check_reward_names(r.rewards, file)
    need(cfg.eval.max_batches >= 0, "eval.max_batches", "must be >= 0", cfg.eval.max_batches)
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1", cfg.eval.batch_size)
