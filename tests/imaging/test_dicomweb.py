"""DICOMweb against a real Orthanc (Debian's orthanc + orthanc-dicomweb) on 127.0.0.1, started once for this module.

The shared DICOM files go in through Orthanc's REST API (the PACSMAN series, CT_small, MR_small: bytes as
they are) and STOW-RS (the three-series CR study); then QIDO filters, WADO-RS retrieval, `ask` / `preview` /
`deid` with --dicomweb are checked against the same files read locally, and each failure is one clear error.
"""

from __future__ import annotations

import http.server
import json
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from openmedgemma.cli import main
from openmedgemma.errors import ImageError, PacsError
from openmedgemma.imaging import load_image, load_series
from openmedgemma.imaging.dicomweb import DicomWebSource
from openmedgemma.imaging.dicomweb_cache import InstanceCache
from openmedgemma.imaging.pacs import image_order_key, load_study, volume_content
from openmedgemma.imaging.pacs_cli import PASSWORD_ENV, TOKEN_ENV, USER_ENV
from tests.orthanc import PASSWORD, USER, Orthanc, require_orthanc

PACSMAN_STUDY = "1.2.826.0.1.3680043.8.498.23904356067352728123256330845974725175"
PACSMAN_SERIES = "1.2.826.0.1.3680043.8.498.12577700408269398389391326344238305188"
CR_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1196527414.5534.0.1"
BROKEN_STUDY, BROKEN_SERIES = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.2"
QUESTION = "Is there a lesion?"


@pytest.fixture(scope="module")
def cr_files(dicom_dir) -> list[Path]:
    folder = dicom_dir / "pydicom_test_files" / "dicomdirtests" / "77654033"  # CR1..3: one study; CT2: another
    return sorted((p for p in folder.glob("CR*/*") if p.is_file()),
                  key=lambda p: image_order_key(pydicom.dcmread(p, stop_before_pixels=True)))  # fmt: skip


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, pacsman_series, ct_small, mr_small, cr_files):
    require_orthanc()
    folder = tmp_path_factory.mktemp("orthanc")
    with Orthanc(folder) as server:
        server.upload(sorted(pacsman_series.glob("*.dcm")) + [ct_small, mr_small])
        server.stow(pydicom.dcmread(path) for path in cr_files + sorted(cr_files[0].parents[1].glob("CT2/*")))
        broken = pydicom.dcmread(ct_small)  # a header promising more pixels than the data holds
        broken.StudyInstanceUID, broken.SeriesInstanceUID = BROKEN_STUDY, BROKEN_SERIES
        broken.SOPInstanceUID, broken.Rows = BROKEN_SERIES + ".1", 512
        broken.save_as(folder / "broken.dcm")
        server.upload([folder / "broken.dcm"])
        yield server


@pytest.fixture
def store(pacs) -> DicomWebSource:
    return DicomWebSource(pacs.dicomweb_url, username=USER, password=PASSWORD, timeout=10)


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint with its tokenizer (the bundled nano model takes ~10x longer on 85 slices)."""
    from tests import tiny

    return tiny.chat_checkpoint(tmp_path_factory.mktemp("chat_ckpt"))


@pytest.fixture(scope="module")
def engine(model_dir):
    from openmedgemma.engine import Engine

    return Engine.from_pretrained(model_dir)


# ---------------------------------------------------------------------- QIDO-RS


def test_qido_filters_return_what_was_uploaded(store):
    everything = {s.study_uid: s for s in store.studies()}
    assert set(everything) >= {PACSMAN_STUDY, CR_STUDY} and len(everything) == 6  # + CT_small, MR_small, CT2, broken
    pacsman = everything[PACSMAN_STUDY]
    assert (pacsman.modalities, pacsman.series_count, pacsman.instance_count, pacsman.date) == (("MR",), 1, 128,
                                                                                                 "20231016")  # fmt: skip
    assert [s.study_uid for s in store.studies(patient_id="PACSMAN1")] == [PACSMAN_STUDY]
    assert [s.study_uid for s in store.studies(modality="CR")] == [CR_STUDY]
    assert len(store.studies(patient_id="77654033")) == 2  # its CR study and its CT study
    assert [s.study_uid for s in store.studies(patient_id="77654033", modality="CR")] == [CR_STUDY]
    assert {s.modalities for s in store.studies(modality="MR")} == {("MR",)} and len(store.studies(modality="MR")) == 2
    assert [s.study_uid for s in store.studies(date="20231001-20231231")] == [PACSMAN_STUDY]
    assert [s.study_uid for s in store.studies(date="20010101", modality="CR")] == [CR_STUDY]
    assert store.studies(patient_id="PACSMAN1", modality="CT") == []
    series = store.series(CR_STUDY)
    assert [(s.modality, s.number, s.instance_count) for s in series] == [("CR", 1, 1), ("CR", 2, 1), ("CR", 3, 1)]
    assert [s.series_uid for s in store.series(PACSMAN_STUDY)] == [PACSMAN_SERIES]
    with pytest.raises(PacsError, match="date '2023': expected YYYYMMDD"):
        store.studies(date="2023")


def test_listing_hides_patients_unless_asked(pacs, credentials, capsys):
    assert main(["dicomweb", "studies", "--dicomweb", pacs.dicomweb_url, "--modality", "CR"]) == 0
    out = capsys.readouterr().out
    assert CR_STUDY in out and "77654033" not in out and "Doe" not in out and out.count("\n") == 1
    assert main(["dicomweb", "studies", "--dicomweb", pacs.dicomweb_url, "--patient", "77654033", "--modality", "CR",
                 "--json", "--show-patient"]) == 0  # fmt: skip
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["study_uid"] == CR_STUDY and row["patient_name"] == "Doe^Archibald" and row["series"] == 3
    assert main(["dicomweb", "series", "--dicomweb", pacs.dicomweb_url, "--study", PACSMAN_STUDY]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == [PACSMAN_SERIES, "MR"]


# ---------------------------------------------------------------------- WADO-RS and the file paths


def test_retrieved_instances_are_the_stored_bytes_and_load_as_the_folder(store, pacsman_series):
    members = store.series_members(PACSMAN_STUDY, PACSMAN_SERIES)
    assert sorted(data for _, data in members) == sorted(p.read_bytes() for p in pacsman_series.glob("*.dcm"))
    assert all(name.startswith(f"{store.url}/studies/{PACSMAN_STUDY}/series/{PACSMAN_SERIES}/instances/")
               for name, _ in members)  # fmt: skip
    assert store.bytes_received >= sum(len(data) for _, data in members)
    remote, local = load_series(members), load_series(pacsman_series)
    np.testing.assert_array_equal(remote.pixels, local.pixels)
    np.testing.assert_array_equal(remote.slice_positions, local.slice_positions)
    assert remote.intensity_range == local.intensity_range and remote.modality == "MR"


def test_ask_on_the_series_gives_the_local_folders_tokens_and_answer(pacs, store, engine, model_dir, pacsman_series,
                                                                      credentials, capsys):  # fmt: skip
    local = [{"role": "user", "content": volume_content(load_series(pacsman_series), QUESTION)}]
    remote = [{"role": "user", "content": store.study_content(PACSMAN_STUDY, QUESTION)}]
    local_prompt, remote_prompt = engine.prepare(local), engine.prepare(remote)
    assert remote_prompt.ids == local_prompt.ids and len(remote_prompt.pixels) == 85
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(remote_prompt.pixels, local_prompt.pixels))
    from openmedgemma.engine import GenerationConfig

    [expected] = engine.generate([local], GenerationConfig(max_new_tokens=6))
    argv = ["ask", "--model", str(model_dir), "--dicomweb", pacs.dicomweb_url, "--study", PACSMAN_STUDY, "--json",
            "--max-new-tokens", "6", QUESTION]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["answer"] == expected.text and answer["prompt_tokens"] == len(local_prompt.ids)
    assert "128-slice MR volume" in captured.err


def test_ask_on_a_cr_study_gives_the_local_images_tokens_and_answer(pacs, store, engine, model_dir, cr_files, credentials,
                                                                   capsys):  # fmt: skip
    local = [{"role": "user", "content": [{"type": "image", "image": str(p)} for p in cr_files]
              + [{"type": "text", "text": QUESTION}]}]  # fmt: skip
    remote = [{"role": "user", "content": store.study_content(CR_STUDY, QUESTION)}]
    local_prompt, remote_prompt = engine.prepare(local), engine.prepare(remote)
    assert remote_prompt.ids == local_prompt.ids and len(remote_prompt.pixels) == 3
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(remote_prompt.pixels, local_prompt.pixels))
    from openmedgemma.engine import GenerationConfig

    [expected] = engine.generate([local], GenerationConfig(max_new_tokens=6))
    argv = ["ask", "--model", str(model_dir), "--dicomweb", pacs.dicomweb_url, "--study", CR_STUDY, "--json",
            "--max-new-tokens", "6", QUESTION]  # fmt: skip
    assert main(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["answer"] == expected.text and answer["prompt_tokens"] == len(local_prompt.ids)
    one = load_study(store, CR_STUDY, store.series(CR_STUDY)[1].series_uid)  # --series picks one of them
    np.testing.assert_array_equal(one.images[0].pixels, load_image(cr_files[1]).pixels)


def test_preview_and_deid_from_the_store(pacs, credentials, pacsman_series, tmp_path, capsys):
    assert main(["preview", str(pacsman_series), "--out", str(tmp_path / "local.png")]) == 0
    argv = ["preview", "--dicomweb", pacs.dicomweb_url, "--study", PACSMAN_STUDY, "--out", str(tmp_path / "web.png")]
    assert main(argv) == 0
    assert (tmp_path / "web.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    assert main(["preview", "--dicomweb", pacs.dicomweb_url, "--study", CR_STUDY, "--out", str(tmp_path / "cr.png")]) == 0
    assert "contact sheet of 3 image(s)" in capsys.readouterr().out

    out = tmp_path / "deid"
    assert main(["deid", "--dicomweb", pacs.dicomweb_url, "--study", PACSMAN_STUDY, str(out)]) == 0
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 128 and "128 instance(s) of 1 series" in capsys.readouterr().out
    cleaned = [pydicom.dcmread(p) for p in files]
    assert {str(ds.get("PatientName", "")) for ds in cleaned} != {"PACSMAN"}
    assert all(PACSMAN_STUDY not in p.read_bytes().decode("latin-1") for p in files[:5])
    np.testing.assert_array_equal(load_series(files).pixels, load_series(pacsman_series).pixels)


# ---------------------------------------------------------------------- the cache


def test_cache_is_off_by_default_private_when_on_and_bounded(pacs, tmp_path):
    folder = tmp_path / "cache"
    store = DicomWebSource(pacs.dicomweb_url, username=USER, password=PASSWORD, cache=InstanceCache(folder))
    first = store.series_members(PACSMAN_STUDY, PACSMAN_SERIES)
    fetched = store.bytes_received
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and len(list(folder.glob("*.dcm"))) == 128
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.glob("*.dcm"))
    assert not any(PACSMAN_SERIES in p.name for p in folder.iterdir())  # names are hashes, not UIDs
    second = store.series_members(PACSMAN_STUDY, PACSMAN_SERIES)
    assert sorted(second) == sorted(first) and store.bytes_received - fetched < fetched / 10  # QIDO only
    small = InstanceCache(tmp_path / "small", max_bytes=100_000)
    DicomWebSource(pacs.dicomweb_url, username=USER, password=PASSWORD, cache=small).series_members(
        PACSMAN_STUDY, PACSMAN_SERIES)
    assert 0 < small.size() <= 100_000


# ---------------------------------------------------------------------- errors: one line, naming URL path and UID


def test_authentication_failures(pacs, capsys, monkeypatch):
    for kwargs in ({}, {"username": USER, "password": "wrong"}, {"token": "not-a-token"}):
        with pytest.raises(PacsError, match=r"/dicom-web/studies: HTTP 401: the server refused the credentials"):
            DicomWebSource(pacs.dicomweb_url, **kwargs).studies()
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert main(["ask", "--model", "no/such/model", "--dicomweb", pacs.dicomweb_url, "--study", PACSMAN_STUDY,
                 QUESTION]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"studies/{PACSMAN_STUDY}/series: HTTP 401" in err and "wrong" not in err


def test_unknown_and_malformed_uids(store, pacs, credentials, capsys):
    missing = "1.2.3.4.5.6.7.8.9"
    with pytest.raises(PacsError, match=rf"/dicom-web/studies/{missing}: no such study on the server"):
        store.study_content(missing, QUESTION)
    with pytest.raises(PacsError, match=rf"studies/{PACSMAN_STUDY}/series/{missing}: no such series in the study"):
        store.study_content(PACSMAN_STUDY, QUESTION, series_uid=missing)
    with pytest.raises(PacsError, match=rf"studies/{PACSMAN_STUDY}/series/{missing}: not found on the server"):
        store.series_members(PACSMAN_STUDY, missing)
    with pytest.raises(PacsError, match=r"study UID '\.\./\.\./system' is not a DICOM UID"):
        store.study_content("../../system", QUESTION)
    assert main(["ask", "--dicomweb", pacs.dicomweb_url, QUESTION]) == 2
    assert "--dicomweb needs --study UID" in capsys.readouterr().err


def test_undecodable_instance_is_named_by_its_url(store):
    with pytest.raises(ImageError, match=rf"studies/{BROKEN_STUDY}/series/{BROKEN_SERIES}/instances/{BROKEN_SERIES}\.1: "
                                         "pixel data cannot be decoded"):  # fmt: skip
        store.study_content(BROKEN_STUDY, QUESTION)


def test_a_partial_series_is_an_error_not_a_smaller_volume(store):
    class Dropping:  # the real store, except that its retrieval loses one instance on the way
        def __getattr__(self, name):
            return getattr(store, name)

        def series_members(self, study_uid, series_uid):
            return store.series_members(study_uid, series_uid)[1:]

    with pytest.raises(PacsError, match=rf"series/{PACSMAN_SERIES}: the server sent 127 of the 128 instances"):
        load_study(Dropping(), PACSMAN_STUDY)


@pytest.fixture
def html_server():
    """A web server on 127.0.0.1 that answers every request with an HTML page: not a DICOMweb store.
    The Authorization headers it received are in `html_server.seen`."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", seen
    server.shutdown()
    server.server_close()


def test_server_answering_something_else_than_dicom(html_server):
    url, seen = html_server
    store = DicomWebSource(url, timeout=5, token="t0ken")
    with pytest.raises(PacsError, match=r"/dicom-web/studies: the server's answer is not DICOM"):
        store.studies()
    with pytest.raises(PacsError, match=rf"/studies/{PACSMAN_STUDY}/series/{PACSMAN_SERIES}: the server's answer is "
                                        "not DICOM"):  # fmt: skip
        store.series_members(PACSMAN_STUDY, PACSMAN_SERIES)
    # credentials in the URL are sent as basic authentication, and never appear in messages
    with pytest.raises(PacsError, match=r"^http://127\.0\.0\.1:\d+/dicom-web/studies: "):
        DicomWebSource(url.replace("http://", "http://ann:pw@"), timeout=5).studies()
    assert seen[:2] == ["Bearer t0ken", "Bearer t0ken"] and seen[-1] == "Basic YW5uOnB3"  # ann:pw


def test_unreachable_and_silent_servers_fail_fast():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(PacsError, match=rf"127.0.0.1:{port}/dicom-web/studies: cannot connect to the DICOMweb server"):
            DicomWebSource(f"http://127.0.0.1:{port}/dicom-web", retries=1).studies()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts connections (the kernel's backlog) but never answers
        port = silent.getsockname()[1]
        with pytest.raises(PacsError, match=rf"127.0.0.1:{port}/dicom-web/studies: no answer within 0.5 s"):
            DicomWebSource(f"http://user:hunter2@127.0.0.1:{port}/dicom-web", timeout=0.5).studies()
    with pytest.raises(PacsError, match="a DICOMweb URL starts with http"):
        DicomWebSource("file:///etc/passwd")
