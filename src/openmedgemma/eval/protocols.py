"""What the evaluation harness needs from a model: two small protocols.

The harness never imports the engine. Anything with these methods can be evaluated; the real
MedGemma engine is plugged in by one adapter class implementing `ChatModel`, and MedSigLIP by one
implementing `Embedder` (see `openmedgemma.eval.loaders`).

Chat messages follow the usual layout::

    {"role": "user" | "assistant" | "system",
     "content": str | [{"type": "text", "text": str} | {"type": "image", "image": IMAGE}, ...]}

where IMAGE is an ``np.uint8`` array of shape (H, W, 3), a ``PIL.Image.Image`` or a file path.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

Message = dict[str, Any]
Conversation = list[Message]


@runtime_checkable
class ChatModel(Protocol):
    """A generator of answers. `generate` returns one decoded answer per conversation.

    Decoding is greedy unless the implementation says otherwise; `seed` is passed so that
    sampling implementations are reproducible. The returned text may still contain a thinking
    block (``<unused94>thought ... <unused95>``); the harness strips it.
    """

    name: str

    def generate(self, batch: list[Conversation], *, max_new_tokens: int, seed: int) -> list[str]: ...


@runtime_checkable
class Embedder(Protocol):
    """A contrastive dual encoder (MedSigLIP-like). Both methods return L2-normalised rows.

    An optional float attribute `logit_scale` (the model's exp(logit_scale)) is used as the
    softmax temperature in zero-shot classification; without it the scale is 1.
    """

    name: str

    def embed_images(self, images: Sequence[Any]) -> Any: ...  # np.ndarray [N, D]

    def embed_texts(self, texts: Sequence[str]) -> Any: ...  # np.ndarray [M, D]
