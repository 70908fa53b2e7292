"""openmedgemma.engine: generation for MedGemma (KV cache, batching, streaming, int4 / int8 / bf16 / fp16 weights) and the ask/chat CLI.

    from openmedgemma.engine import Engine, GenerationConfig
    engine = Engine.from_pretrained("path/to/medgemma-4b-it")
    [result] = engine.generate([[{"role": "user", "content": "What is a pneumothorax?"}]],
                               GenerationConfig(max_new_tokens=128))
    print(result.text)

Low level (RL training): `generate_ids(model, prompts, images, config, stop_ids) -> list[list[int]]`.
Names are resolved lazily so that importing the CLI module does not import torch.
"""

from openmedgemma.lazy import lazy_exports

_EXPORTS = {
    # the errors its functions raise, importable where they are called
    "OpenMedGemmaError": "openmedgemma.errors",
    "CheckpointError": "openmedgemma.errors",
    "ImageError": "openmedgemma.errors",
    "TokenizerError": "openmedgemma.errors",
    "Engine": "openmedgemma.engine.engine",
    "GenerationResult": "openmedgemma.engine.engine",
    "GenerationConfig": "openmedgemma.engine.sampling",
    "generate_ids": "openmedgemma.engine.generate",
    "TokenStream": "openmedgemma.engine.generate",
    "plan_chunks": "openmedgemma.engine.generate",
    "KVCache": "openmedgemma.engine.cache",
    "DecoderRunner": "openmedgemma.engine.fast",
    "Int8Linear": "openmedgemma.engine.quant",
    "HalfLinear": "openmedgemma.engine.half",
    "Int4Linear": "openmedgemma.engine.int4",
    "quantize": "openmedgemma.engine.quant",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
