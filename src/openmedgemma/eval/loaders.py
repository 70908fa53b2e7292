"""Loading a model for evaluation from a path given on the command line.

`load_chat_model` wraps the MedGemma engine as a `protocols.ChatModel`, `load_embedder` wraps
MedSigLIP as a `protocols.Embedder`. The CLI looks them up at call time (tests swap in scripted models).
"""

from __future__ import annotations


def load_chat_model(path: str):
    """A MedGemma checkpoint folder (config.json, safetensors, tokenizer.json) as a ChatModel."""
    from openmedgemma.eval.chat_model import MedGemmaChatModel

    return MedGemmaChatModel.from_pretrained(path)


def load_embedder(path: str):
    """A MedSigLIP checkpoint folder (config.json, safetensors, spiece.model) as an Embedder."""
    from openmedgemma.eval.embedder import MedSigLIPEmbedder

    return MedSigLIPEmbedder.from_pretrained(path)


def load_endpoint(url: str, kind: str, *, api_key: str | None = None, model: str | None = None, concurrency: int = 8):
    """The chat model or embedder behind an OpenAI-compatible server (`model`: its id; default the first)."""
    import os

    from openmedgemma.eval.endpoint import OpenAIChatModel, OpenAIEmbedder

    key = api_key or os.environ.get("OPENAI_API_KEY")
    if kind == "chat":
        return OpenAIChatModel(url, api_key=key, model=model, concurrency=concurrency)
    return OpenAIEmbedder(url, api_key=key, model=model)
