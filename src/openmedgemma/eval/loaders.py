"""Loading a model for evaluation from a path given on the command line.

These are the two seams where the real engine plugs in: replace `load_chat_model` with one that
returns an adapter implementing `protocols.ChatModel` around the MedGemma engine, and
`load_embedder` with one implementing `protocols.Embedder` around MedSigLIP. The CLI looks them
up at call time, so replacing the functions here is enough.
"""

from __future__ import annotations

from openmedgemma.errors import OpenMedGemmaError


def load_chat_model(path: str):
    raise OpenMedGemmaError(
        f"cannot load {path}: the MedGemma generation engine is not available in this build yet, "
        "so `openmedgemma eval` has no chat model to run (the harness itself works with any "
        "object implementing openmedgemma.eval.protocols.ChatModel)"
    )


def load_embedder(path: str):
    """A MedSigLIP checkpoint folder (config.json, safetensors, spiece.model) as an Embedder."""
    from openmedgemma.eval.embedder import MedSigLIPEmbedder

    return MedSigLIPEmbedder.from_pretrained(path)
