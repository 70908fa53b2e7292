"""`openmedgemma serve --dicomweb URL` against a real Orthanc: a request names a study / series by UID on that one
store and gets what the same images sent as data: URIs get; nothing else is reachable through it."""

from __future__ import annotations

import base64
import io
import zipfile

import httpx
import pydicom
import pytest

from openmedgemma.serve.dicomweb import content_from_dicomweb
from openmedgemma.serve.media import MediaError
from tests.orthanc import PASSWORD, USER, Orthanc, require_orthanc
from tests.serve.conftest import ServerProcess

SUB_STUDY, SUB_SERIES = "1.2.826.0.1.3680043.10.1818.1", "1.2.826.0.1.3680043.10.1818.2"
CR_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1196527414.5534.0.1"


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """(40 slices of the PACSMAN phantom as a study of their own: 85 slices exceed nano's 2048-token context;
    the three CR images of one study)."""
    folder = tmp_path_factory.mktemp("sub_series")
    pacsman = []
    slices = sorted((shared_data / "dicom" / "pacsman_synthetic" / "dicomseries").glob("*.dcm"))[:40]
    for index, path in enumerate(slices):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = SUB_STUDY, SUB_SERIES, f"{SUB_SERIES}.{index + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name)
        pacsman.append(folder / path.name)
    crs = sorted((shared_data / "dicom" / "pydicom_test_files" / "dicomdirtests" / "77654033").glob("CR*/*"),
                 key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber))  # fmt: skip
    return pacsman, crs


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, data):
    require_orthanc()
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(data[0] + data[1])
        yield server


@pytest.fixture(scope="module")
def served(pacs):
    env = {"OPENMEDGEMMA_DICOMWEB_USER": USER, "OPENMEDGEMMA_DICOMWEB_PASSWORD": PASSWORD}
    srv = ServerProcess("--max-batch", "4", "--dicomweb", pacs.dicomweb_url, env=env)
    yield srv
    log = srv.stop()
    assert PASSWORD not in log and "PACSMAN" not in log and "Doe" not in log  # no credentials, no patient names


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _zip(paths) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths:
            archive.write(path, path.name)
    return buffer.getvalue()


def _ask(server, urls: list[str]) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    body = {"messages": [{"role": "user", "content": content + [{"type": "text", "text": "Findings?"}]}],
            "max_tokens": 5, "temperature": 0}  # fmt: skip
    return httpx.post(server.api + "/chat/completions", json=body, timeout=300)


def test_a_series_by_uid_is_the_same_request_as_its_zip(served, data):
    by_uid = _ask(served, [f"dicomweb:studies/{SUB_STUDY}/series/{SUB_SERIES}"])
    by_zip = _ask(served, [_data_uri(_zip(data[0]), "application/zip")])
    assert by_uid.status_code == by_zip.status_code == 200, by_uid.text
    assert by_uid.json()["usage"]["prompt_tokens"] == by_zip.json()["usage"]["prompt_tokens"] > 40 * 16
    assert by_uid.json()["choices"][0]["message"] == by_zip.json()["choices"][0]["message"]


def test_a_cr_study_by_uid_is_the_same_request_as_its_files(served, data):
    by_uid = _ask(served, [f"dicomweb:studies/{CR_STUDY}"])
    by_files = _ask(served, [_data_uri(p.read_bytes(), "application/dicom") for p in data[1]])
    assert by_uid.status_code == by_files.status_code == 200, by_uid.text
    assert by_uid.json()["usage"]["prompt_tokens"] == by_files.json()["usage"]["prompt_tokens"]
    assert by_uid.json()["choices"][0]["message"] == by_files.json()["choices"][0]["message"]


@pytest.mark.parametrize(("url", "message"), [
    ("dicomweb:studies/1.2.3.4", "dicomweb:studies/1.2.3.4: no such study on the server"),
    (f"dicomweb:studies/{SUB_STUDY}/series/9.9", f"dicomweb:studies/{SUB_STUDY}/series/9.9: no such series"),
    ("dicomweb:studies/..%2f..%2fsystem", "study UID '..%2f..%2fsystem' is not a DICOM UID"),
    ("dicomweb:http://127.0.0.1:1/dicom-web/studies/1.2", "expected dicomweb:studies/<study UID>"),
    ("http://127.0.0.1:1/dicom-web/studies/1.2", "only data: URIs are accepted"),
])  # fmt: skip
def test_a_request_names_uids_on_the_configured_store_only(served, pacs, url, message):
    answer = _ask(served, [url])
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == "messages[0].content[0].image_url"
    assert str(pacs.port) not in error["message"]  # the store's address is not shown to clients


def test_without_a_store_dicomweb_urls_are_refused():
    with pytest.raises(MediaError, match="this server reads no DICOMweb store"):
        content_from_dicomweb(f"dicomweb:studies/{CR_STUDY}", None)
