"""Tiny configs (as Hugging Face config.json dicts) and helpers shared by the parity tests.

The shapes keep every feature the real models have: 5 sliding : 1 global layers, GQA, a
query_pre_attn_scalar different from head_dim, linear-scaled global RoPE, a patch grid pooled
to the soft tokens, and an image soft token placed beyond the vocabulary (as in some checkpoints).
"""

from __future__ import annotations

import torch

VOCAB = 96
BOI, EOI, IMAGE = 90, 91, 96  # IMAGE == VOCAB: beyond the embedding table
TOKENS_PER_IMAGE = 16
IMAGE_SIZE = 56
WINDOW = 8


def gemma_text_hf_config(**overrides) -> dict:
    cfg = dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=WINDOW, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


def vision_hf_config(**overrides) -> dict:
    cfg = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=7, layer_norm_eps=1e-6, vision_use_head=False)  # fmt: skip
    cfg.update(overrides)
    return cfg


def gemma_mm_hf_config(text_overrides: dict | None = None, **overrides) -> dict:
    text = gemma_text_hf_config(**(text_overrides or {}))
    text.pop("architectures")
    cfg = dict(
        model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text,
        vision_config=vision_hf_config(), mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=BOI,
        eoi_token_index=EOI, image_token_index=IMAGE,
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


def siglip_hf_config() -> dict:
    return dict(
        model_type="siglip", architectures=["SiglipModel"],
        text_config=dict(model_type="siglip_text_model", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16, projection_size=24),
        vision_config=vision_hf_config(vision_use_head=True, hidden_size=24, num_attention_heads=3, image_size=28),
    )  # fmt: skip


def hf_model(config: dict, seed: int = 0, embed_std: float = 0.15):
    """A transformers model of this config with every weight random (norms and projector too)."""
    import transformers

    cls = {"gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration", "siglip": "SiglipModel"}
    model = getattr(transformers, cls[config["model_type"]])(transformers.AutoConfig.for_model(**config))
    randomize(model, seed, embed_std)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int = 0, embed_std: float = 0.15) -> None:
    """Every weight random with std 0.15, the token embeddings with `embed_std`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (embed_std if "embed_tokens" in name else 0.15))


def image_prompt(images: int, text: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    """bos, text, then per image: text, boi, soft tokens, eoi; ends with text. [1, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = [2]
    for _ in range(images):
        ids += torch.randint(3, BOI, (5,), generator=g).tolist() + [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]
    ids += text if text is not None else torch.randint(3, BOI, (7,), generator=g).tolist()
    return torch.tensor([ids])


def pixels(n: int, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- generation (tests/engine) ------------------------------------------------------------------


# Small token embeddings so that greedy continuations vary: with the tied head and embeddings as large as
# the other weights, a random Gemma repeats its input token forever, which would make comparisons weak.
GENERATION_EMBED_STD = 0.02


def hf_generation_model(config: dict, seed: int = 0):
    """`hf_model` with GENERATION_EMBED_STD token embeddings and stopping disabled (no eos)."""
    model = hf_model(config, seed, embed_std=GENERATION_EMBED_STD)
    model.generation_config.eos_token_id = None
    return model


CHAT_CORPUS = [
    "The chest X-ray shows a small left pleural effusion and no pneumothorax.",
    "No acute cardiopulmonary process. The heart size is normal.",
    "Describe the image. What is the most likely diagnosis? Answer with one word.",
    "thought The lungs are clear. Final Answer: (B) yes no normal abnormal",
] * 4
CHAT_VOCAB = 400  # compact tokenizer: pad 0, eos 1, bos 2, <end_of_turn> 6, boi 7, eoi 8, image 9


def chat_checkpoint(folder, multimodal: bool = True):
    """A tiny checkpoint folder with a matching compact tokenizer (config.json, safetensors, tokenizer.json)."""
    from openmedgemma.config import from_hf_config
    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.tokenizer import Tokenizer, build_tokenizer

    build_tokenizer(folder, "compact", CHAT_CORPUS, vocab_size=CHAT_VOCAB)
    tok = Tokenizer.from_pretrained(folder)
    text = dict(vocab_size=CHAT_VOCAB, eos_token_id=[tok.eos_id, tok.end_of_turn_id])
    if multimodal:
        config = gemma_mm_hf_config(text, boi_token_index=tok.boi_id, eoi_token_index=tok.eoi_id,
                                    image_token_index=tok.image_token_id)  # fmt: skip
    else:
        config = gemma_text_hf_config(**text)
    model = MedGemma(from_hf_config(config))
    randomize(model, embed_std=GENERATION_EMBED_STD)
    model.save_pretrained(folder)
    return folder
