"""Model configs: dataclasses, a named registry, and conversion from/to Hugging Face config.json.

`from_hf_config` reads every spelling transformers has used for Gemma 3:
  - 4.50: flat `rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`;
  - 4.5x: the same plus `layer_types`;
  - 5.x: `rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`.
Fields the official config.json files leave out take transformers' defaults, which is why the
defaults below mirror `Gemma3TextConfig`, `SiglipVisionConfig` and `SiglipTextConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openmedgemma.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass
class GemmaTextConfig:
    """Gemma 3 decoder. Defaults are transformers' Gemma3TextConfig defaults."""

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()  # filled from the 5:1 pattern when empty
    rope_local_theta: float = 10_000.0
    rope_global_theta: float = 1_000_000.0
    rope_global_linear_factor: float = 1.0  # "linear" rope scaling on global layers (8 for 4B/27B)
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"unknown layer type(s) {unknown}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


@dataclass
class VisionConfig:
    """SigLIP vision tower. Defaults are transformers' SiglipVisionConfig defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = True  # the attention-pooling (MAP) head; off inside MedGemma

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class SiglipTextConfig:
    """SigLIP text tower. Defaults are transformers' SiglipTextConfig defaults."""

    vocab_size: int = 32_000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    projection_size: int | None = None  # None: hidden_size
    pad_token_id: int = 1
    # Unused by the model (it pools the last position); written so that loaders do not fill in CLIP's ids,
    # which lie outside a small vocabulary. None: the tokenizer has no such token.
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size


@dataclass
class MedGemmaConfig:
    """A MedGemma checkpoint: the decoder, and the vision tower + projector when multimodal."""

    text: GemmaTextConfig = field(default_factory=GemmaTextConfig)
    vision: VisionConfig | None = None  # None: text-only (Gemma3ForCausalLM layout)
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    def __post_init__(self):
        if self.vision is not None:
            side = self.vision.image_size // self.vision.patch_size
            per_side = round(self.mm_tokens_per_image**0.5)
            if per_side * per_side != self.mm_tokens_per_image or side % per_side:
                raise ConfigError(
                    f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides the "
                    f"{side}x{side} patch grid"
                )


@dataclass
class MedSigLIPConfig:
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Layer i is global iff (i + 1) % pattern == 0 (5 sliding : 1 global for Gemma 3)."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


# ----------------------------------------------------------------------------- registry

_GEMMA3_4B_TEXT = dict(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
    rope_global_linear_factor=8.0,
)  # fmt: skip
_GEMMA3_27B_TEXT = dict(
    hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
    num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
    rope_global_linear_factor=8.0,
)  # fmt: skip
_SO400M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)


def _medgemma_4b() -> MedGemmaConfig:
    # google/medgemma-4b-it config.json (Gemma3ForConditionalGeneration; same shapes as google/gemma-3-4b-it)
    return MedGemmaConfig(
        text=GemmaTextConfig(vocab_size=262_208, **_GEMMA3_4B_TEXT),
        vision=VisionConfig(image_size=896, use_head=False, **_SO400M_VISION),
    )


def _medgemma_27b_text() -> MedGemmaConfig:
    # google/medgemma-27b-text-it config.json (Gemma3ForCausalLM, model_type gemma3_text). The text-only
    # checkpoint carries the 262144-entry Gemma 3 vocabulary (no image soft token row); the spec pins
    # 262208 only for the multimodal checkpoints. from_pretrained always reads the file's own value.
    return MedGemmaConfig(text=GemmaTextConfig(vocab_size=262_144, **_GEMMA3_27B_TEXT), vision=None)


def _medgemma_27b() -> MedGemmaConfig:
    # google/medgemma-27b-it config.json (Gemma3ForConditionalGeneration; shapes of google/gemma-3-27b-it)
    return MedGemmaConfig(
        text=GemmaTextConfig(vocab_size=262_208, **_GEMMA3_27B_TEXT),
        vision=VisionConfig(image_size=896, use_head=False, **_SO400M_VISION),
    )


def _medsiglip_448() -> MedSigLIPConfig:
    # google/medsiglip-448 config.json (SiglipModel: so400m/14 towers at 448, 64 text tokens)
    return MedSigLIPConfig(
        text=SiglipTextConfig(
            vocab_size=32_000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, max_position_embeddings=64, projection_size=1152,
        ),
        vision=VisionConfig(image_size=448, use_head=True, **_SO400M_VISION),
    )  # fmt: skip


# The nano reference models (`openmedgemma train nano`; models/medgemma-nano and models/medsiglip-nano hold
# the trained checkpoints, whose config.json these mirror). Same families as the real ones: a Gemma 3 decoder
# with the 5:1 sliding/global pattern (window 64, so prompts of ~100 tokens wrap the ring buffer) and a SigLIP
# tower shared by both models. Ids 7/8/9 are <start_of_image>/<end_of_image>/<image_soft_token> in the compact
# tokenizer (openmedgemma.tokenizer.build_tokenizer(layout="compact")).
_NANO_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)


def _medgemma_nano() -> MedGemmaConfig:
    # models/medgemma-nano/config.json (Gemma3ForConditionalGeneration, 6.4M parameters)
    return MedGemmaConfig(
        text=GemmaTextConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
            max_position_embeddings=2048,
        ),
        vision=VisionConfig(use_head=False, **_NANO_VISION),
        mm_tokens_per_image=16, boi_token_index=7, eoi_token_index=8, image_token_index=9,
    )  # fmt: skip


def _medsiglip_nano() -> MedSigLIPConfig:
    # models/medsiglip-nano/config.json (SiglipModel, 2.0M parameters; spiece.model of 1024 pieces, 32 text tokens)
    return MedSigLIPConfig(
        text=SiglipTextConfig(
            vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
            max_position_embeddings=32, projection_size=128,
            bos_token_id=None, eos_token_id=1,  # spiece.model: no <s>; </s> = 1 (also the pad, as in SigLIP)
        ),
        vision=VisionConfig(use_head=True, **_NANO_VISION),
    )  # fmt: skip


REGISTRY: dict[str, Any] = {
    "nano": _medgemma_nano,
    "medsiglip-nano": _medsiglip_nano,
    "4b": _medgemma_4b,
    "27b-text": _medgemma_27b_text,
    "27b": _medgemma_27b,
    "medsiglip-448": _medsiglip_448,
}


def get_config(name: str) -> MedGemmaConfig | MedSigLIPConfig:
    """A fresh config from the registry (`nano`, `medsiglip-nano`, `4b`, `27b-text`, `27b`, `medsiglip-448`)."""
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


# ----------------------------------------------------------------------------- HF config.json

MEDGEMMA_ARCHITECTURES = {"Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"}
MEDSIGLIP_ARCHITECTURES = {"SiglipModel"}


def read_hf_config(path: str | Path) -> dict:
    """The parsed config.json of a checkpoint folder, with clear errors."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json in this folder (is it a Hugging Face checkpoint folder?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file}: cannot read config.json: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: config.json must hold a JSON object")
    return data


def from_hf_config(data: dict) -> MedGemmaConfig | MedSigLIPConfig:
    """Our config from a Hugging Face config dict (any transformers version's spelling)."""
    model_type = data.get("model_type")
    if model_type == "gemma3":
        vision = data.get("vision_config") or {}
        return MedGemmaConfig(
            text=_gemma_text_from_hf(data.get("text_config") or {}),
            vision=_vision_from_hf(vision, use_head_default=True),
            mm_tokens_per_image=data.get("mm_tokens_per_image", 256),
            boi_token_index=data.get("boi_token_index", data.get("boi_token_id", 255_999)),
            eoi_token_index=data.get("eoi_token_index", data.get("eoi_token_id", 256_000)),
            image_token_index=data.get("image_token_index", data.get("image_token_id", 262_144)),
        )
    if model_type == "gemma3_text":
        return MedGemmaConfig(text=_gemma_text_from_hf(data), vision=None)
    if model_type == "siglip":
        return MedSigLIPConfig(
            text=_siglip_text_from_hf(data.get("text_config") or {}),
            vision=_vision_from_hf(data.get("vision_config") or {}, use_head_default=True),
        )
    archs = data.get("architectures")
    raise ConfigError(
        f"unsupported architecture (model_type={model_type!r}, architectures={archs!r}); openmedgemma loads "
        "gemma3 (Gemma3ForConditionalGeneration), gemma3_text (Gemma3ForCausalLM) and siglip (SiglipModel)"
    )


def _rope_from_hf(d: dict) -> dict:
    """(local theta, global theta, global linear factor) from any of the three spellings."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):  # transformers 5
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
    else:  # 4.50 / 4.5x flat fields (a 5.x single-dict rope_parameters reads like rope_scaling)
        full = dict(d.get("rope_scaling") or params or {})
        full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
        sliding = {"rope_type": "default", "rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    for name, p in ((FULL, full), (SLIDING, sliding)):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {rope_type!r} on {name} layers is not supported (only {SUPPORTED_ROPE_TYPES})")
    if sliding.get("rope_type", sliding.get("type", "default")) != "default":
        raise ConfigError("scaled RoPE on sliding layers is not used by Gemma 3 and is not supported")
    linear = full.get("rope_type", full.get("type", "default")) == "linear"
    return dict(
        rope_local_theta=float(sliding.get("rope_theta", 10_000.0)),
        rope_global_theta=float(full.get("rope_theta", 1_000_000.0)),
        rope_global_linear_factor=float(full.get("factor", 1.0)) if linear else 1.0,
    )


def _gemma_text_from_hf(d: dict) -> GemmaTextConfig:
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(cap) is not None:
            raise ConfigError(f"{cap}={d[cap]} is set; Gemma 3 uses no softcapping and openmedgemma does not support it")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True (an encoder variant) is not a MedGemma decoder")
    defaults = GemmaTextConfig.__dataclass_fields__
    kw = {
        name: d[name]
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
            "max_position_embeddings", "rms_norm_eps", "pad_token_id", "eos_token_id", "bos_token_id",
        )
        if d.get(name) is not None and name in defaults
    }  # fmt: skip
    act = d.get("hidden_activation") or d.get("hidden_act")
    if act:
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {act!r} is not Gemma 3's gelu_pytorch_tanh")
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    num_layers = kw.get("num_hidden_layers", defaults["num_hidden_layers"].default)
    if d.get("layer_types"):
        kw["layer_types"] = tuple(d["layer_types"])
    else:
        kw["layer_types"] = default_layer_types(num_layers, int(d.get("sliding_window_pattern") or 6))
    kw.update(_rope_from_hf(d))
    return GemmaTextConfig(**kw)


def _vision_from_hf(d: dict, use_head_default: bool) -> VisionConfig:
    kw = {k: d[k] for k in VisionConfig.__dataclass_fields__ if k in d and k != "use_head"}
    kw["use_head"] = bool(d.get("vision_use_head", use_head_default))
    return VisionConfig(**kw)


def _siglip_text_from_hf(d: dict) -> SiglipTextConfig:
    return SiglipTextConfig(**{k: d[k] for k in SiglipTextConfig.__dataclass_fields__ if k in d})


def to_hf_config(config: MedGemmaConfig | MedSigLIPConfig, dtype: str = "float32") -> dict:
    """A config.json that transformers >= 4.50 loads (flat rope fields plus layer_types)."""
    if isinstance(config, MedSigLIPConfig):
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "torch_dtype": dtype,
            "text_config": {"model_type": "siglip_text_model", **dataclasses.asdict(config.text)},
            "vision_config": _vision_to_hf(config.vision),
        }
    text = _gemma_text_to_hf(config.text, dtype)
    if not config.is_multimodal:
        return {"architectures": ["Gemma3ForCausalLM"], **text}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "torch_dtype": dtype,
        "text_config": text,
        "vision_config": _vision_to_hf(config.vision),
        "mm_tokens_per_image": config.mm_tokens_per_image,
        "boi_token_index": config.boi_token_index,
        "eoi_token_index": config.eoi_token_index,
        "image_token_index": config.image_token_index,
        "tie_word_embeddings": True,
    }


def _gemma_text_to_hf(t: GemmaTextConfig, dtype: str) -> dict:
    d = dataclasses.asdict(t)
    scaling = {"rope_type": "linear", "factor": t.rope_global_linear_factor} if t.rope_global_linear_factor != 1.0 else None
    for key in ("rope_local_theta", "rope_global_theta", "rope_global_linear_factor"):
        d.pop(key)
    d.update(
        model_type="gemma3_text",
        torch_dtype=dtype,
        layer_types=list(t.layer_types),
        rope_theta=t.rope_global_theta,
        rope_local_base_freq=t.rope_local_theta,
        rope_scaling=scaling,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    return d


def _vision_to_hf(v: VisionConfig) -> dict:
    d = dataclasses.asdict(v)
    d["vision_use_head"] = d.pop("use_head")
    return {"model_type": "siglip_vision_model", **d}
