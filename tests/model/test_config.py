"""Configs: the registry's shapes, and every spelling of the HF config.json."""

from __future__ import annotations

import copy

import pytest
import transformers

from openmedgemma.config import (
    FULL,
    SLIDING,
    MedGemmaConfig,
    from_hf_config,
    get_config,
    read_hf_config,
    to_hf_config,
)
from openmedgemma.errors import ConfigError
from openmedgemma.model.medgemma import MedGemma
from openmedgemma.model.medsiglip import MedSigLIP
from openmedgemma.model.pretrained import params_on_meta
from tests import tiny

# google/gemma-3-4b-it (and google/medgemma-4b-it) config.json: a sparse text_config, the rest defaults.
OFFICIAL_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}  # fmt: skip


def param_count(name: str) -> int:
    config = get_config(name)
    with params_on_meta():
        model = (MedSigLIP if name.startswith("medsiglip") else MedGemma)(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,count",
    [
        ("4b", 4_300_079_472),  # published size of Gemma 3 4B IT / MedGemma 4B
        ("27b", 27_432_406_640),  # published size of Gemma 3 27B IT / MedGemma 27B multimodal
        ("27b-text", 27_009_002_240),  # the 27B decoder alone, 262144-entry vocabulary
        ("medsiglip-448", 878_300_338),  # SigLIP so400m/14: ~428M vision + ~450M text
    ],
)
def test_registry_shapes_have_the_published_sizes(name, count):
    assert param_count(name) == count


def test_4b_layer_pattern_and_rope():
    t = get_config("4b").text
    assert [i for i, kind in enumerate(t.layer_types) if kind == FULL] == [5, 11, 17, 23, 29]
    assert t.layer_types.count(SLIDING) == 29
    assert (t.rope_local_theta, t.rope_global_theta, t.rope_global_linear_factor) == (1e4, 1e6, 8.0)


def test_official_sparse_config_equals_registry():
    assert from_hf_config(OFFICIAL_4B) == get_config("4b")


def spellings() -> dict[str, dict]:
    """One decoder config in the three spellings transformers has written."""
    v450 = tiny.gemma_text_hf_config(sliding_window_pattern=6)
    v45x = {**v450, "layer_types": [SLIDING] * 5 + [FULL]}
    v5 = {k: v for k, v in v45x.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {
        FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    }
    return {"4.50": v450, "4.5x": v45x, "5.x": v5}


def test_three_spellings_read_the_same():
    configs = {k: from_hf_config(v) for k, v in spellings().items()}
    assert configs["4.50"] == configs["4.5x"] == configs["5.x"]
    t = configs["5.x"].text
    assert t.rope_global_linear_factor == 8.0 and t.layer_types[-1] == FULL


def test_transformers_reads_what_we_write_and_we_read_what_it_writes():
    ours = from_hf_config(tiny.gemma_mm_hf_config())
    hf = transformers.Gemma3Config(**to_hf_config(ours))  # transformers parses our config.json
    assert hf.text_config.rope_parameters[FULL]["factor"] == 8.0
    assert hf.text_config.layer_types == list(ours.text.layer_types)
    assert from_hf_config(hf.to_dict()) == ours  # and we parse its 5.x rewrite back to the same


def test_medsiglip_config_round_trip():
    ours = from_hf_config(tiny.siglip_hf_config())
    assert from_hf_config(transformers.SiglipConfig(**to_hf_config(ours)).to_dict()) == ours


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(model_type="llama", architectures=["LlamaForCausalLM"]), "unsupported architecture"),
        (lambda d: d.update(final_logit_softcapping=30.0), "softcapping"),
        (lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (lambda d: d.update(layer_types=[SLIDING] * 3), "layer_types has 3 entries"),
        (lambda d: d.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
    ],
)
def test_bad_configs_are_named(change, message):
    d = copy.deepcopy(tiny.gemma_text_hf_config())
    change(d)
    with pytest.raises(ConfigError, match=message):
        from_hf_config(d)


def test_unknown_registry_name_lists_known():
    with pytest.raises(ConfigError, match="known: .*4b"):
        get_config("8b")


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config.json"):
        read_hf_config(tmp_path)


def test_mm_tokens_must_tile_the_patch_grid():
    with pytest.raises(ConfigError, match="mm_tokens_per_image"):
        MedGemmaConfig(vision=get_config("4b").vision, mm_tokens_per_image=200)
