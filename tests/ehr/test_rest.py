"""The REST backend against a real FHIR server from PyPI (`fhirsnake`), loaded with the shared bundles.

fhirsnake 1.1.0 is the FHIR server installable from the registries here: it serves read (`Type/id`) and
type-level search, but ignores every search parameter (`patient`, `code`, dates, `_count`, `_include`) and
never pages. So this test checks what it can: real HTTP through fhirpy, reads, and the RestStore's own
filtering of what the server returns (it must give the same resources as the embedded store, and report
that the server ignored `patient`). Paging through `next` links, `_include` and the bearer token are tested
against tests/ehr/fhir_search_server.py instead, a minimal server that honours them.
The resources are written as fhirsnake expects them (resources/Type/id.json), references resolved as a
server would after a transaction.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openmedgemma.ehr.bundles import load_bundles
from openmedgemma.ehr.rest import RestStore
from openmedgemma.ehr.store import open_store
from openmedgemma.ehr.tools import Tools
from openmedgemma.errors import RecordError

from .fhir_search_server import ServerThread, make_app

try:
    import fhirsnake
except ImportError:  # installed by .ci/run (pip install --no-deps fhirsnake==1.1.0): a failure in CI
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("fhirsnake is not installed: pip install --no-deps fhirsnake==1.1.0", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUNDLES = 5  # of the 25: enough for every type, and a fast start


@pytest.fixture(scope="module")
def bundles(synthea_dir) -> list[Path]:
    return sorted(synthea_dir.glob("*.json"))[:BUNDLES]


@pytest.fixture(scope="module")
def store(bundles):
    with open_store(bundles) as s:
        yield s


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("fhirsnake")
    for item in load_bundles(bundles):
        folder = root / "resources" / item.resource["resourceType"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{item.resource['id']}.json").write_text(json.dumps(item.resource))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(fhirsnake.__file__).parent)}  # fhirsnake imports `files` top-level
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"fhirsnake exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("fhirsnake did not start within 60 s")
    yield url
    proc.terminate()
    proc.wait(10)


def test_rest_returns_what_the_embedded_store_returns(server, store):
    rest = RestStore(server)
    assert rest.patients() == store.patients()
    assert len(store.patients()) == BUNDLES
    for patient in store.patients():
        pid = patient["id"]
        assert rest.patient(pid) == store.patient(pid)
        assert rest.types(pid) == store.types(pid)
        for rtype in rest.types(pid):
            assert rest.search(pid, rtype) == store.search(pid, rtype), rtype
        obs = store.search(pid, "Observation")
        code = obs[-1]["code"]["coding"][0]["code"]
        for kwargs in ({"codes": [code]}, {"date_from": "2015", "date_to": "2017-06-30"}):
            assert rest.search(pid, "Observation", **kwargs) == store.search(pid, "Observation", **kwargs)
        for req in rest.search(pid, "MedicationRequest"):
            ref = req["requester"]["reference"]
            assert rest.read(ref) == store.read(ref)
    assert "patient" in rest.ignored_parameters  # fhirsnake ignores it; the store filtered


def test_cli_lists_the_servers_patients(server, store, capsys):
    from openmedgemma.cli import main

    assert main(["ehr", "patients", "--records", server, "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == store.patients()


def test_rest_errors(server):
    with pytest.raises(RecordError, match="no patient with id 'nobody'"):
        RestStore(server).patient("nobody")
    with pytest.raises(RecordError, match="unreachable"):
        RestStore(f"http://127.0.0.1:{_free_port()}", timeout=2).patients()


def test_paging_and_bearer_token_against_a_searching_server(store):
    """tests/ehr/fhir_search_server.py honours the search parameters and pages (fhirsnake does neither)."""
    app, port = make_app(store, "s3cret"), _free_port()
    with ServerThread(app, port):
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(RecordError, match="401"):
            RestStore(url).patients()
        rest = RestStore(url, token="s3cret", page_size=7)
        assert rest.patients() == store.patients()
        searches, before = 0, app.state.requests
        for patient in store.patients():
            for rtype in store.types(patient["id"]):
                assert rest.search(patient["id"], rtype) == store.search(patient["id"], rtype)
                searches += 1
            obs = store.search(patient["id"], "Observation")
            code = obs[0]["code"]["coding"][0]["code"]
            assert rest.search(patient["id"], "Observation", codes=[code], date_from="2012") == store.search(
                patient["id"], "Observation", codes=[code], date_from="2012")
            searches += 1
        assert app.state.requests - before > 2 * searches  # every Observation search took several pages
        assert rest.ignored_parameters == set()


def test_include_and_medication_references(tmp_path):
    """A MedicationRequest naming its drug by medicationReference: indexed, searched and shown by its code."""
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    resources = [
        {"resourceType": "Patient", "id": "p-1", "name": [{"given": ["Ann"], "family": "Lee"}]},
        {"resourceType": "Medication", "id": "med-1", "code": {"coding": [{"system": rx, "code": "2", "display": "Drug B"}]}},
        {"resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
         "medicationReference": {"reference": "urn:uuid:med-1"}, "subject": {"reference": "urn:uuid:p-1"},
         "authoredOn": "2021-03-04"},
    ]  # fmt: skip
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction",
                                "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}))
    with open_store([path]) as local:
        assert [r["id"] for r in local.search("p-1", "MedicationRequest", codes=[f"{rx}|2"])] == ["mr-1"]
        assert "Medication/med-1 (Drug B)" in Tools(local).resources("p-1", "MedicationRequest").text
        assert "2 Drug B [RxNorm] x1" in Tools(local).manifest("p-1").text
        app, port = make_app(local, "t"), _free_port()
        with ServerThread(app, port):
            rest = RestStore(f"http://127.0.0.1:{port}", token="t")
            assert [r["id"] for r in rest.search("p-1", "MedicationRequest", codes=["2"])] == ["mr-1"]
            before = app.state.requests
            assert rest.read("Medication/med-1")["code"]["coding"][0]["display"] == "Drug B"
            assert app.state.requests == before  # it came with the search (_include), not a second request
