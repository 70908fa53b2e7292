"""openmedgemma.train: the MedGemma training recipe (spec §3) in small, readable pieces.

    from openmedgemma.train import Trainer, load_config
    Trainer(load_config("configs/train/sft_vqa_rad_lora.toml", "sft")).run()

Pieces: `config` (TOML -> dataclasses), `data` (dataset readers, MixtureSampler), `collate` (chat formatting and
label masking), `losses`, `rewards`, `distill` (sparse teacher stores), `lora` (peft LoRA / QLoRA), `loop`
(Trainer), `checkpointing`, `distributed`, `cli`. Exports resolve lazily, so importing the package is cheap.
"""

from __future__ import annotations

from openmedgemma.lazy import lazy_exports

_EXPORTS = {
    # the errors its functions raise, importable where they are called
    "OpenMedGemmaError": "openmedgemma.errors",
    "ConfigError": "openmedgemma.errors",
    "DataError": "openmedgemma.errors",
    "CheckpointError": "openmedgemma.errors",
    "TrainConfig": "config",
    "load_config": "config",
    "config_from_dict": "config",
    "Example": "data",
    "MixtureSampler": "data",
    "captions_from_qa": "data",
    "vqa_rad": "data",
    "pneumonia_mnist": "data",
    "mcq": "data",
    "pubmedqa": "data",
    "image_text": "data",
    "load_source": "data",
    "LMCollator": "collate",
    "SiglipCollator": "collate",
    "sigmoid_loss": "losses",
    "causal_lm_loss": "losses",
    "sparse_distill_loss": "losses",
    "grpo_loss": "losses",
    "group_advantages": "losses",
    "register_reward": "rewards",
    "get_reward": "rewards",
    "write_teacher_store": "distill",
    "TeacherStore": "distill",
    "apply_lora": "lora",
    "load_adapter": "lora",
    "merge_adapter": "lora",
    "save_adapter": "lora",
    "Trainer": "loop",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
