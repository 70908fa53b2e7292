"""LoRA and QLoRA through peft, on our own modules (peft is imported only here, and only when used: it pulls
transformers, which the rest of openmedgemma does not need).

The official notebook's recipe: adapters on all linear layers (decoder q/k/v/o/gate/up/down and SigLIP
q/k/v/out_proj/fc1/fc2), r 16, alpha 16, dropout 0.05; QLoRA keeps the frozen base in 4-bit NF4
(bitsandbytes `Linear4bit`, which also runs on CPU in bitsandbytes >= 0.45).

Adapters are saved in PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained(MedGemma.from_pretrained(base), adapter_dir)` loads them; `merge_adapter`
folds them into a full checkpoint that `MedGemma.from_pretrained` reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from openmedgemma.errors import ConfigError

PEFT_HINT = "LoRA needs peft: pip install 'openmedgemma[train]'"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(PEFT_HINT) from None
    return peft


def target_regex(targets: list[str], parts: list[str]) -> str:
    """peft `target_modules` as a regex (full match on module names): the named linear layers inside the
    transformer blocks of the given parts (all parts when empty). SigLIP's attention-pooling head is left
    out: its `nn.MultiheadAttention` reads `out_proj.weight` directly, so an adapter there would be ignored."""
    part = "|".join(re.escape(p) for p in parts) if parts else r"[^.]+"
    names = "|".join(re.escape(t) for t in targets)
    return rf"^(?:{part})\.(?:.*\.)?layers\.\d+\.(?:.*\.)?(?:{names})$"


def apply_lora(model: nn.Module, r: int = 16, alpha: int = 16, dropout: float = 0.05, targets=None,
               parts=None, quantize: str = "none"):
    """Wrap `model` in a peft model with LoRA adapters; only adapter weights stay trainable.

    quantize="nf4" first replaces the targeted linear layers by 4-bit bitsandbytes layers (QLoRA)."""
    from openmedgemma.train.config import ALL_LINEAR

    peft = _peft()
    regex = target_regex(list(targets or ALL_LINEAR), list(parts or []))
    matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    if not matched:
        raise ConfigError(f"lora: no linear layer matches targets {targets} in parts {parts or 'all'}")
    if quantize == "nf4":
        quantize_nf4(model, matched)
    elif quantize != "none":
        raise ConfigError(f"lora.quantize = {quantize!r}; use 'none' or 'nf4'")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none")
    wrapped = peft.get_peft_model(model, config)
    source = getattr(model, "source", None)
    if source is not None:
        wrapped.peft_config["default"].base_model_name_or_path = str(source)
    return wrapped


def quantize_nf4(model: nn.Module, names: list[str]) -> None:
    """Replace the named nn.Linear layers by frozen bitsandbytes NF4 layers (compute in the weight dtype)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("lora.quantize = 'nf4' (QLoRA) needs bitsandbytes: pip install 'openmedgemma[qlora]'") from None
    for name in names:
        linear = model.get_submodule(name)
        device = linear.weight.device
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type="nf4", quant_storage=torch.uint8)  # fmt: skip
        q.weight = bnb.nn.Params4bit(linear.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        q = q.to(device)  # quantizes the weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


def save_adapter(peft_model, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """A peft model of `model` (e.g. `MedGemma.from_pretrained(base)`) with the saved adapter loaded."""
    peft = _peft()
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_adapter(peft_model) -> nn.Module:
    """The base model with the adapters folded into its weights (the adapters removed)."""
    return peft_model.merge_and_unload()


def merged_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Write base + adapter as one full HF-layout checkpoint (for QLoRA: merged into the full-precision base,
    not into the 4-bit weights)."""
    from openmedgemma.model.medgemma import MedGemma

    base = MedGemma.from_pretrained(base_dir, dtype=dtype)
    merged = merge_adapter(load_adapter(base, adapter_dir))
    merged.save_pretrained(out_dir)
    return Path(out_dir)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying MedGemma / MedSigLIP of a peft model (itself otherwise)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(model, "peft_config") else model
