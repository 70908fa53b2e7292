"""from_pretrained / save_pretrained shared by MedGemma and MedSigLIP."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from openmedgemma import checkpoint
from openmedgemma.config import from_hf_config, read_hf_config, to_hf_config
from openmedgemma.errors import CheckpointError

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextlib.contextmanager
def params_on_meta():
    """Build a model without allocating its parameters: tensors created inside default to the meta device.

    Nothing is allocated before `checkpoint.load_into` has compared every shape with the files, so a
    config.json that disagrees with the weights (say a hidden_size of 65536) costs no memory. Buffers that
    are computed at construction and not stored in checkpoints (RoPE frequencies) name the CPU explicitly
    and stay real. Random init of meta tensors is skipped: their values are never used, and torch's meta
    kernel for normal_ (nn.Embedding's init) imports torch._dynamo, which costs ~2 s per process.
    """
    original_normal = torch.Tensor.normal_

    def normal_(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else original_normal(tensor, *args, **kwargs)

    torch.Tensor.normal_ = normal_
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.Tensor.normal_ = original_normal


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}  # fmt: skip
    try:
        return names[str(dtype).replace("torch.", "")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use float32 or bfloat16") from None


class PretrainedMixin:
    """Subclasses define `config_class`, `_disk_to_internal(config)` and `_internal_to_disk(config, layout)`."""

    config_class: type
    refuse_fp16: str | None = None  # the reason, for models that must not run in fp16

    @classmethod
    def _check_dtype(cls, dtype: torch.dtype | None, where: str) -> None:
        if dtype == torch.float16 and cls.refuse_fp16:
            raise CheckpointError(f"{where}: float16 is refused: {cls.refuse_fp16}")

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face layout folder (config.json + safetensors), lazily memory-mapped.

        dtype: None keeps the checkpoint's own dtype; float32 or bfloat16 convert while loading.
        """
        folder = Path(path).expanduser()
        config = from_hf_config(read_hf_config(folder))
        if not isinstance(config, cls.config_class):
            raise CheckpointError(
                f"{folder}: holds a {type(config).__name__.replace('Config', '')} checkpoint, not a {cls.__name__} one"
            )
        ckpt = checkpoint.Checkpoint(folder)
        dtype = resolve_dtype(dtype)
        file_dtype = ckpt.floating_dtype()
        cls._check_dtype(dtype or file_dtype, str(folder) + (" (weights are stored in float16; pass dtype='bfloat16' or 'float32')" if dtype is None else ""))
        with params_on_meta():
            model = cls(config)
        checkpoint.load_into(model, ckpt, cls._disk_to_internal(config), dtype, device)
        if device is not None:
            model.to(device)  # buffers
        model.source = folder
        return model.eval()

    def save_pretrained(self, path, layout: str = "original", max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write the HF layout that transformers loads: config.json + (sharded) safetensors.

        layout: "original" writes the names of Google's released files (`language_model.model.*`);
        "transformers" writes those of transformers >= 4.52 (`model.language_model.*`).
        """
        if layout not in ("original", "transformers"):
            raise CheckpointError(f"unknown layout {layout!r}; use 'original' or 'transformers'")
        rename = self._internal_to_disk(self.config, layout)
        tensors = {}
        for name, t in self.state_dict().items():
            disk = rename(name)
            if disk is not None:
                tensors[disk] = t
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        dtype_name = _DTYPE_NAMES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
        checkpoint.save_sharded(tensors, path, max_shard_bytes)
        checkpoint.write_config(path, to_hf_config(self.config, dtype_name))
