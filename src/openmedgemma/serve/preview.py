"""`POST /v1/preview` (an openmedgemma extension): the RGB the model will see for one `image_url`.

The web page calls it when a file is attached or the CT preset changes, so the user checks the
windows before asking. It goes through `media.content_from_image_url`, the very function the chat
endpoint uses, so the preview cannot drift from the model input. Body:

    {"image_url": "data:application/dicom;base64,...", "ct_preset": "medgemma" | "report-v4" | null}

Answer: {"object": "openmedgemma.preview", "png": "data:image/png;base64,...", "images": N,
"width": W, "height": H, "caption": "..."}. One image comes back at its native size (before the
model's resize to 896); a series or multi-frame volume comes back as the `openmedgemma preview`
contact sheet of its sampled slices in SLICE order, each tile shrunk to at most TILE_MAX pixels a
side so that 85 slices stay a small PNG. Bad input raises the media module's MediaError, which the
app answers with an OpenAI-shaped 400. The app includes this router with its API-key dependency.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from openmedgemma.serve.app import APIError

TILE_MAX = 256  # pixels per side of one slice in a contact sheet

router = APIRouter()


class PreviewRequest(BaseModel):
    image_url: str = Field(description="a data: URI, as in a chat image_url part")
    ct_preset: str | None = Field(default=None, description="CT window preset; null for the default")


class PreviewResponse(BaseModel):
    object: str = "openmedgemma.preview"
    png: str  # data:image/png;base64,...
    images: int  # images the model receives (slices of a series)
    width: int  # of one image as the model receives it, before its resize to 896
    height: int
    caption: str


@router.post("/v1/preview", response_model=PreviewResponse)
def preview(body: PreviewRequest, request: Request) -> PreviewResponse:
    # A plain def: FastAPI runs it in its thread pool, so decoding never blocks the event loop.
    from openmedgemma.imaging.windowing import PRESETS
    from openmedgemma.serve.media import content_from_image_url

    if body.ct_preset is not None and body.ct_preset not in PRESETS:
        raise APIError(400, f"ct_preset {body.ct_preset!r} is unknown; choose one of {sorted(PRESETS)}", "ct_preset")
    limits = request.app.state.server.config.media  # the chat endpoint's caps (pixels, zip members and bytes)
    content = content_from_image_url(body.image_url, preset=body.ct_preset, field="image_url", limits=limits)
    images = [item["image"] for item in content if item.get("type") == "image"]
    height, width = images[0].shape[:2]
    if len(images) == 1:
        rgb, caption = images[0], f"{width}x{height} RGB, as the model sees it before its resize"
    else:
        rgb = _contact_sheet(images)
        caption = f"{len(images)} slices (SLICE 1-{len(images)}, row by row), each {width}x{height} RGB"
    return PreviewResponse(png=_png_data_uri(rgb), images=len(images), width=width, height=height, caption=caption)


def _contact_sheet(images: list[np.ndarray]) -> np.ndarray:
    from PIL import Image

    from openmedgemma.imaging.cli import contact_sheet

    height, width = images[0].shape[:2]
    scale = min(1.0, TILE_MAX / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    tiles = [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) if scale < 1 else image
             for image in images]
    return contact_sheet(np.stack(tiles))


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
