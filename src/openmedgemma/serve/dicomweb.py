"""Request images from the one DICOMweb store `openmedgemma serve --dicomweb URL` names.

An `image_url` part whose URL is `dicomweb:studies/<study UID>` or `dicomweb:studies/<study UID>/series/<series
UID>` is read from that store (imaging.dicomweb, imaging.pacs) and becomes the same items as a data: URI of
the same images: a CT / MR series its <= 85 sampled slices each followed by "SLICE n", a CR / DX study its
images, a whole-slide series its tissue patches. A client names UIDs only, never a URL: the server talks to
no address but the configured store (no server-side request forgery), and UIDs are checked before they
enter a URL path.
"""

from __future__ import annotations

import re

from openmedgemma.errors import OpenMedGemmaError
from openmedgemma.serve.media import MediaError, MediaLimits

PREFIX = "dicomweb:"
_PATH = re.compile(r"^studies/(?P<study>[^/]+)(/series/(?P<series>[^/]+))?/?$")


def is_dicomweb_url(url) -> bool:
    return isinstance(url, str) and url[: len(PREFIX)].lower() == PREFIX


def content_from_dicomweb(url: str, store, *, preset: str | None = None, field: str = "image_url",
                          limits: MediaLimits = MediaLimits()) -> list[dict]:  # fmt: skip
    """Chat content items for a `dicomweb:studies/...` image URL; MediaError naming `field` otherwise."""
    from openmedgemma.imaging.dicomweb import check_uid
    from openmedgemma.imaging.pacs import load_study, study_items

    if store is None:
        raise MediaError(f"{field}: this server reads no DICOMweb store (start it with --dicomweb URL)", field)
    match = _PATH.match(url[len(PREFIX):])
    if not match:
        raise MediaError(f"{field}: expected dicomweb:studies/<study UID> or dicomweb:studies/<study UID>/series/"
                         "<series UID>", field)  # fmt: skip
    try:
        study = check_uid(match.group("study"), "study UID")
        series = check_uid(match.group("series"), "series UID") if match.group("series") else None
        return study_items(load_study(store, study, series, max_pixels=limits.max_pixels), preset)
    except OpenMedGemmaError as err:  # the store's own address stays out of what clients see
        raise MediaError(f"{field}: {str(err).replace(store.url + '/', PREFIX)}", field) from None
