"""Models behind an OpenAI-compatible server as the harness's `ChatModel` / `Embedder`.

    model = OpenAIChatModel("http://127.0.0.1:8000/v1", api_key=None, concurrency=8)
    openmedgemma eval medqa --endpoint http://127.0.0.1:8000/v1 --concurrency 8

Works with `openmedgemma serve` and with any server speaking OpenAI's API (vLLM serving the real
MedGemma 27B on a GPU cluster, for example): the harness sends the report's prompts greedily
(temperature 0, the run's seed) and reads back the text; images travel as base64 `data:` URIs
(PNG, or the DICOM file's own bytes). Requests go only to the URL given.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from openmedgemma.errors import OpenMedGemmaError


class EndpointError(OpenMedGemmaError):
    """The server could not be reached or refused a request."""


class _Client:
    def __init__(self, base_url: str, api_key: str | None, model: str | None, kind: str, timeout: float):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.client = OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model = model or self._default_model(kind)
        self.name = self.model

    def _call(self, fn, *args, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIConnectionError as err:
            raise EndpointError(f"{self.base_url}: cannot connect ({err.__cause__ or err})") from None
        except openai.APIStatusError as err:
            message = err.body.get("message") if isinstance(err.body, dict) else None
            raise EndpointError(f"{self.base_url}: HTTP {err.status_code}: {message or err.message}") from None

    def _default_model(self, kind: str) -> str:
        models = self._call(self.client.models.list).data
        if not models:
            raise EndpointError(f"{self.base_url}: the server lists no models")
        for m in models:  # openmedgemma's extension says which model is which
            extra = (m.model_extra or {}).get("openmedgemma") or {}
            if extra.get("kind") == kind:
                return m.id
        return models[0].id


class OpenAIChatModel(_Client):
    """A `ChatModel` over an OpenAI-compatible chat endpoint; `concurrency` requests in flight at once."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None, concurrency: int = 4,
                 timeout: float = 600.0):  # fmt: skip
        if concurrency < 1:
            raise OpenMedGemmaError(f"concurrency must be >= 1, got {concurrency}")
        super().__init__(base_url, api_key, model, "chat", timeout)
        self.concurrency = concurrency

    def generate(self, batch: list[list[dict]], *, max_new_tokens: int, seed: int) -> list[str]:
        def one(conversation):
            return self.complete(conversation, max_tokens=max_new_tokens, seed=seed)["content"] or ""

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, batch))

    def complete(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice=None,
                 max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None) -> dict[str, Any]:  # fmt: skip
        """One chat completion: the assistant message as a dict (`content`, `tool_calls`, ...)."""
        kwargs = dict(model=self.model, messages=[_message(m) for m in messages], max_tokens=max_tokens,
                      temperature=temperature, seed=seed)  # fmt: skip
        if tools:
            kwargs.update(tools=tools, tool_choice=tool_choice or "auto")
        response = self._call(self.client.chat.completions.create, **kwargs)
        return response.choices[0].message.model_dump(exclude_none=True)


class OpenAIEmbedder(_Client):
    """An `Embedder` over `/v1/embeddings`; images are sent as data: URIs (openmedgemma's extension)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0, batch_size: int = 32):  # fmt: skip
        super().__init__(base_url, api_key, model, "embedding", timeout)
        self.batch_size = batch_size

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return self._embed([data_uri(im) for im in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(list(texts))

    def _embed(self, items: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(items), self.batch_size):
            response = self._call(self.client.embeddings.create, model=self.model,
                                  input=items[start : start + self.batch_size])  # fmt: skip
            rows += [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
        return np.asarray(rows, dtype=np.float32).reshape(len(items), -1) if rows else np.zeros((0, 0), np.float32)


def _message(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = []
    for item in content:
        if item.get("type") == "image":
            image = next(item[k] for k in ("image", "path", "url") if item.get(k) is not None)
            parts.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
        else:
            parts.append(item)
    return {**message, "content": parts}


def data_uri(image) -> str:
    """A base64 data: URI: a file's own bytes (PNG, JPEG, DICOM), else the image as PNG."""
    from openmedgemma.imaging.sniff import sniff_format

    mime = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
        kind = sniff_format(data)
        if kind in mime:
            return f"data:{mime[kind]};base64,{base64.b64encode(data).decode()}"
        from openmedgemma.imaging.loader import load_image

        image = load_image(data)
    from PIL import Image

    from openmedgemma.imaging.pixel_values import as_rgb_uint8

    buf = io.BytesIO()
    Image.fromarray(as_rgb_uint8(image)).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
