"""POST /v1/embeddings on MedSigLIP: OpenAI's text inputs, and images as `data:` URIs (an extension).

Each `input` item is a string (text, or an image when it is a `data:` URI: PNG, JPEG or DICOM); token
lists are refused (MedSigLIP has its own SentencePiece tokenizer). Vectors are L2-normalised
MedSigLIP image / text features, as `MedSigLIP.get_image_features` / `get_text_features` then
normalised; `encoding_format: "base64"` packs little-endian float32 as OpenAI does.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from openmedgemma.serve.app import APIError, ServerState, ready_state
from openmedgemma.serve.media import content_from_image_url
from openmedgemma.serve.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, Usage

router = APIRouter()
MAX_INPUTS = 256


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: ServerState = Depends(ready_state)):
    served = state.model(body.model, "embedding")
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items or not all(isinstance(x, str) for x in items):
        raise APIError(400, "input must be a string or a list of strings (text, or images as data: URIs); "
                       "token ids are not accepted", "input")  # fmt: skip
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"{len(items)} inputs; at most {MAX_INPUTS} per request", "input")
    if body.dimensions is not None:
        raise APIError(400, "dimensions is not supported: MedSigLIP's vectors have a fixed size", "dimensions")
    vectors, tokens = await run_in_threadpool(_embed, state, items)
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=served.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def _embed(state: ServerState, items: list[str]) -> tuple[np.ndarray, int]:
    embedder = state.embedder
    images, texts = {}, {}
    for i, item in enumerate(items):
        if item.startswith("data:"):
            parts = content_from_image_url(item, field=f"input[{i}]", limits=state.config.media)
            pictures = [p["image"] for p in parts if p["type"] == "image"]
            if len(pictures) != 1:
                raise APIError(400, f"input[{i}]: one image per input (this is a volume of {len(pictures)} slices)",
                               f"input[{i}]")  # fmt: skip
            images[i] = pictures[0]
        else:
            texts[i] = item
    out = np.zeros((len(items), embedder.model.config.text.projection_size), dtype=np.float32)
    if images:
        out[list(images)] = embedder.embed_images(list(images.values()))
    if texts:
        out[list(texts)] = embedder.embed_texts(list(texts.values()))
    tokens = sum(len(embedder.tokenizer.encode(t)) for t in texts.values())
    return out, tokens


def _encode(vector: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
