"""A DICOMweb store (a PACS) as an image source: QIDO-RS search, WADO-RS retrieval, on `dicomweb-client`.

    store = DicomWebSource("http://pacs:8042/dicom-web", token=...)
    store.studies(patient_id="P1", modality="CT")         # QIDO-RS: StudyInfo list
    store.series(study_uid)                               # QIDO-RS: SeriesInfo list
    members = store.series_members(study_uid, series_uid)  # WADO-RS: (URL path, DICOM bytes) per instance
    content = store.study_content(study_uid, "Findings?")  # chat content items (imaging.pacs)

Instances come back as the bytes the server stored and go through `load_series` / `load_image` as
files do, so windows, sorting, sampling and errors are the same. Every request has a timeout; connection
failures and 502/503/504 answers of GET requests are retried a bounded number of times. Each failure is one
PacsError naming the URL path and the UID. UIDs are checked before they are put in a URL path, so a UID
from a client can only name a study or series on this one store. Credentials never appear in messages.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from openmedgemma.errors import PacsError
from openmedgemma.imaging.dicom_io import short_reason

DEFAULT_TIMEOUT = 30.0  # seconds to connect, and between bytes of an answer
DEFAULT_RETRIES = 2
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")

# QIDO attribute tags (DICOM JSON keys)
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_ID, PATIENT_NAME, STUDY_DATE = "00100020", "00100010", "00080020"
STUDY_DESCRIPTION, SERIES_DESCRIPTION, MODALITY = "00081030", "0008103E", "00080060"
MODALITIES_IN_STUDY, SERIES_NUMBER, INSTANCE_NUMBER = "00080061", "00200011", "00200013"
STUDY_SERIES_COUNT, STUDY_INSTANCE_COUNT, SERIES_INSTANCE_COUNT = "00201206", "00201208", "00201209"
SOP_CLASS = "00080016"


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str
    date: str
    description: str
    modalities: tuple[str, ...]
    series_count: int | None
    instance_count: int | None
    patient_id: str  # identifying: printed by the CLI only when asked
    patient_name: str  # identifying: printed by the CLI only when asked


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    modality: str
    number: int | None
    description: str
    instance_count: int | None


def check_uid(uid: str, what: str = "UID") -> str:
    """A DICOM UID (digits and dots, at most 64 characters), else PacsError: it goes into a URL path."""
    text = str(uid).strip()
    if not text or len(text) > 64 or not _UID.match(text):
        raise PacsError(f"{what} {text[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return text


class DicomWebSource:
    """One DICOMweb store. `token` (bearer) or `username` + `password` (basic) authenticate.

    `cache`: an `InstanceCache` (imaging.dicomweb_cache) keeping retrieved instances on local disk; None
    (the default) keeps nothing on disk. `bytes_received` / `requests_made` count the traffic.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        cache=None,
    ):
        from dicomweb_client import DICOMwebClient

        # dicomweb-client's retry wrapper logs each failed attempt with a traceback; the failure itself is
        # reported as one PacsError, so keep those logs from Python's last-resort stderr handler
        logging.getLogger("retrying").addHandler(logging.NullHandler())
        self.url = _display_url(url)
        self.timeout = float(timeout)
        self.cache = cache
        self.bytes_received = 0
        self.requests_made = 0
        self._last = threading.local()  # the Content-Type of this thread's last answer (a server shares the store)
        session = _session(url, token, username, password, self.timeout, retries)
        try:
            self.client = DICOMwebClient(_strip_userinfo(url).rstrip("/"), session=session, callback=self._count)
        except ValueError as err:
            raise PacsError(f"{self.url}: not a DICOMweb URL ({err})") from None
        self.client.set_http_retry_params(retry=False)  # the session's adapter retries, briefly

    def _count(self, response, *args, **kwargs):
        self.requests_made += 1
        self.bytes_received += len(response.content)  # answers are read whole (no streaming here)
        self._last.content_type = response.headers.get("Content-Type", "")
        return response

    # ------------------------------------------------------------------ QIDO-RS

    def studies(self, *, patient_id: str | None = None, modality: str | None = None, date: str | None = None,
                limit: int = 100) -> list[StudyInfo]:  # fmt: skip
        """Studies matching all the filters given; `date` is YYYYMMDD or a range YYYYMMDD-YYYYMMDD."""
        filters = {}
        if patient_id:
            filters["PatientID"] = patient_id
        if modality:
            filters["ModalitiesInStudy"] = modality.strip().upper()
        if date:
            if not _DATE.match(date.strip()) or date.strip() == "-":
                raise PacsError(f"date {date!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
            filters["StudyDate"] = date.strip()
        fields = ["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "PatientID", "PatientName", "StudyDate"]  # fmt: skip
        with self._errors("studies"):
            found = self.client.search_for_studies(search_filters=filters, fields=fields, limit=limit)
            return [_study_info(item) for item in found]

    def series(self, study_uid: str, *, modality: str | None = None) -> list[SeriesInfo]:
        """The series of a study, by SeriesNumber; PacsError when the study is not on the store."""
        study_uid = check_uid(study_uid, "study UID")
        filters = {"Modality": modality.strip().upper()} if modality else {}
        fields = ["SeriesDescription", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances"]
        with self._errors(f"studies/{study_uid}/series"):
            found = self.client.search_for_series(study_uid, search_filters=filters, fields=fields)
            if not found and modality:  # tell "no such study" from "no series of that modality"
                found_any = self.client.search_for_series(study_uid, limit=1)
            else:
                found_any = found
            if not found_any:
                raise PacsError(f"{self.url}/studies/{study_uid}: no such study on the server")
            infos = [_series_info(item) for item in found]
        return sorted(infos, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def instance_uids(self, study_uid: str, series_uid: str) -> list[str]:
        study_uid, series_uid = check_uid(study_uid, "study UID"), check_uid(series_uid, "series UID")
        with self._errors(f"studies/{study_uid}/series/{series_uid}/instances"):
            found = self.client.search_for_instances(study_uid, series_uid, fields=["SOPInstanceUID"],
                                                     get_remaining=True)  # fmt: skip
            return [_text(item, SOP_UID) for item in found]

    # ------------------------------------------------------------------ WADO-RS

    def series_members(self, study_uid: str, series_uid: str) -> list[tuple[str, bytes]]:
        """(URL path of the instance, its DICOM bytes) for every instance of the series.

        With a cache, instances already on disk are not fetched again when the whole series is there."""
        study_uid, series_uid = check_uid(study_uid, "study UID"), check_uid(series_uid, "series UID")
        path = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        if self.cache is not None:
            uids = self.instance_uids(study_uid, series_uid)
            cached = [self.cache.get(self.url, study_uid, series_uid, uid) for uid in uids]
            if uids and all(data is not None for data in cached):
                return [(f"{path}/instances/{uid}", data) for uid, data in zip(uids, cached)]
        with self._errors(f"studies/{study_uid}/series/{series_uid}"):
            datasets = self._retrieve_series(study_uid, series_uid)
        if not datasets:
            raise PacsError(f"{path}: the series holds no instances")
        members = []
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", "") or "")
            name = f"{path}/instances/{uid or len(members) + 1}"
            members.append((name, _raw_bytes(ds, name)))
            if self.cache is not None and uid:
                self.cache.put(self.url, study_uid, series_uid, uid, members[-1][1])
        return members

    def _retrieve_series(self, study_uid: str, series_uid: str) -> list:
        """The instances as stored (transfer-syntax=*: no transcoding, so the bytes of a compressed image
        are those a file would hold, and fewer of them); a server refusing `*` is asked for its default."""
        import requests

        try:
            return self.client.retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
        except requests.HTTPError as err:
            if err.response is None or err.response.status_code not in (400, 406, 415):
                raise
        return self.client.retrieve_series(study_uid, series_uid)

    def study_content(self, study_uid: str, question: str, series_uid: str | None = None, **options) -> list[dict]:
        """Chat content items for a question about a study (or one series of it): see imaging.pacs."""
        from openmedgemma.imaging.pacs import load_study, study_content

        return study_content(load_study(self, study_uid, series_uid, **_load_options(options)), question,
                             **options)  # fmt: skip

    def open_slide(self, study_uid: str, series_uid: str):
        """The slide of a VL Whole Slide Microscopy series, read tile by tile (imaging.dicom_slide)."""
        from openmedgemma.imaging.dicom_slide import open_web_slide

        study_uid, series_uid = check_uid(study_uid, "study UID"), check_uid(series_uid, "series UID")
        name = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        with self._errors(f"studies/{study_uid}/series/{series_uid}"):
            syntax = self._stored_frame_syntax(study_uid, series_uid, name)
            return open_web_slide(self.client, study_uid, series_uid, name, syntax)

    def _stored_frame_syntax(self, study_uid: str, series_uid: str, name: str) -> str | None:
        """The transfer syntax the slide's tiles are stored in, read from the answer to one frame asked for
        "as stored" (transfer-syntax=*). Asking wsidicom for it avoids a server-side transcoding (lossless
        tiles turned into lossy JPEG, or a server that cannot encode the codec wsidicom would prefer)."""
        import requests

        from openmedgemma.imaging.dicom_slide import WSI_SOP_CLASS

        found = self.client.search_for_instances(study_uid, series_uid, fields=["SOPClassUID", "SOPInstanceUID"])
        if not found:
            raise PacsError(f"{name}: no such series on the server")
        slide_instances = [_text(item, SOP_UID) for item in found if _text(item, SOP_CLASS) == WSI_SOP_CLASS]
        if not slide_instances:
            return None  # wsidicom says what is wrong with the series
        try:
            self.client.retrieve_instance_frames(study_uid, series_uid, slide_instances[0], [1],
                                                 media_types=(("application/octet-stream", "*"),))  # fmt: skip
        except requests.HTTPError:
            return None  # a server that cannot answer "as stored": let wsidicom negotiate
        match = re.search(r"transfer-syntax=\"?([0-9.]+)", getattr(self._last, "content_type", ""))
        return match.group(1) if match else None

    # ------------------------------------------------------------------ errors

    @contextmanager
    def _errors(self, what: str):
        """Turn what requests / dicomweb-client / pydicom raise into one PacsError naming the URL path."""
        import requests
        from pydicom.errors import InvalidDicomError

        where = f"{self.url}/{what}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-standard Content-Type, bulk data URIs: not the user's concern
                yield
        except PacsError:
            raise
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status in (401, 403):
                raise PacsError(f"{where}: HTTP {status}: the server refused the credentials (set "
                                "OPENMEDGEMMA_DICOMWEB_TOKEN, or OPENMEDGEMMA_DICOMWEB_USER and "
                                "OPENMEDGEMMA_DICOMWEB_PASSWORD)") from None  # fmt: skip
            if status == 404:
                raise PacsError(f"{where}: not found on the server (HTTP 404)") from None
            reason = err.response.reason if err.response is not None else ""
            raise PacsError(f"{where}: the server answered HTTP {status} {reason}".rstrip()) from None
        except requests.Timeout:
            raise PacsError(f"{where}: no answer within {self.timeout:g} s") from None
        except requests.ConnectionError as err:
            if "timed out" in str(err):  # a read timeout behind the retry adapter arrives as a ConnectionError
                raise PacsError(f"{where}: no answer within {self.timeout:g} s") from None
            raise PacsError(f"{where}: cannot connect to the DICOMweb server ({_connection_reason(err)})") from None
        except (InvalidDicomError, ValueError, KeyError, EOFError, AttributeError, TypeError) as err:
            # a non-DICOM part, an answer that is not JSON or not multipart, JSON of the wrong shape
            raise PacsError(f"{where}: the server's answer is not DICOM ({short_reason(err)})") from None
        except requests.RequestException as err:
            raise PacsError(f"{where}: request failed ({short_reason(err)})") from None


def _raw_bytes(ds, name: str) -> bytes:
    """The bytes the server sent for this instance (pydicom keeps the buffer it read from)."""
    buffer = getattr(ds, "buffer", None)
    if isinstance(buffer, io.BytesIO):
        return buffer.getvalue()
    out = io.BytesIO()  # a reader that kept no buffer: write the data set back as a Part 10 file
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as err:
        raise PacsError(f"{name}: the instance cannot be re-encoded ({short_reason(err)})") from None
    return out.getvalue()


def _load_options(options: dict) -> dict:
    """The options of study_content that shape what is loaded (the rest shape the prompt)."""
    keys = ("magnification", "max_patches", "patch", "seed", "max_pixels")
    return {key: options.pop(key) for key in keys if key in options}


def _session(url: str, token, username, password, timeout: float, retries: int):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class _Session(requests.Session):
        def request(self, method, url, **kwargs):
            kwargs.setdefault("timeout", timeout)
            return super().request(method, url, **kwargs)

    session = _Session()
    session.trust_env = False  # no proxy or netrc from the environment: the store is the one named
    retry = Retry(total=retries, connect=retries, read=0, status=retries, backoff_factor=0.2,
                  status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET"}), raise_on_status=False)  # fmt: skip
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    parts = urlsplit(url)
    username = username if username is not None else parts.username
    password = password if password is not None else parts.password
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username is not None:
        session.auth = (username, password or "")
    return session


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"{_display_url(url)}: a DICOMweb URL starts with http:// or https:// and names a host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _display_url(url: str) -> str:
    """The URL without user:password, query or trailing slash: fit for messages."""
    try:
        parts = urlsplit(str(url).strip())
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    except ValueError:
        return "<malformed URL>"


def _connection_reason(err) -> str:
    text = str(err)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return short_reason(err)


def _study_info(item: dict) -> StudyInfo:
    return StudyInfo(
        study_uid=_text(item, STUDY_UID),
        date=_text(item, STUDY_DATE),
        description=_text(item, STUDY_DESCRIPTION),
        modalities=tuple(str(v) for v in _values(item, MODALITIES_IN_STUDY)),
        series_count=_int(item, STUDY_SERIES_COUNT),
        instance_count=_int(item, STUDY_INSTANCE_COUNT),
        patient_id=_text(item, PATIENT_ID),
        patient_name=_text(item, PATIENT_NAME),
    )


def _series_info(item: dict) -> SeriesInfo:
    return SeriesInfo(
        series_uid=_text(item, SERIES_UID),
        modality=_text(item, MODALITY).upper(),
        number=_int(item, SERIES_NUMBER),
        description=_text(item, SERIES_DESCRIPTION),
        instance_count=_int(item, SERIES_INSTANCE_COUNT),
    )


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


def _text(item: dict, tag: str) -> str:
    values = _values(item, tag)
    if not values:
        return ""
    value = values[0]
    if isinstance(value, dict):  # PN: {"Alphabetic": ...}
        value = value.get("Alphabetic", "")
    return str(value)


def _int(item: dict, tag: str) -> int | None:
    try:
        return int(_values(item, tag)[0])
    except (IndexError, TypeError, ValueError):
        return None
