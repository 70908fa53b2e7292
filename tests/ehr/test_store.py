"""The embedded store on the 25 shared bundles, compared with the raw JSON; bad input; small fixture bundles."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from openmedgemma.ehr.sqlite import SQLiteStore, build_index
from openmedgemma.ehr.store import open_store
from openmedgemma.errors import RecordError


def test_every_resource_indexed_with_counts_per_type(store, raw):
    expected = Counter(t for t, _ in raw.resources)  # distinct (type, id): shared organisations count once
    assert store.counts() == dict(expected)


def test_references_resolved_to_literal_type_id(store, raw):
    checked = 0
    for rtype, rid in raw.resources:
        resource = store.read(f"{rtype}/{rid}")
        assert "urn:uuid:" not in json.dumps(resource)
        for ref in [v for k, v in _walk(resource) if k == "reference"]:
            assert ref.startswith("#") or store.read(ref) is not None, ref
            checked += 1
    assert checked > 10_000


def _walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_searches_equal_the_raw_json(store, raw):
    patients = {p["id"] for p in store.patients()}
    assert patients == {rid for t, rid in raw.resources if t == "Patient"}
    for pid in sorted(patients)[:8]:
        for rtype in ("Condition", "Observation", "MedicationRequest", "Immunization", "Encounter"):
            expected = {r["id"] for r in raw.of(pid, rtype)}
            assert {r["id"] for r in store.search(pid, rtype)} == expected
        obs = raw.of(pid, "Observation")
        code = obs[0]["code"]["coding"][0]["code"]
        want = {r["id"] for r in obs if any(c["code"] == code for c in r["code"]["coding"])}
        assert {r["id"] for r in store.search(pid, "Observation", codes=[code])} == want
        assert {r["id"] for r in store.search(pid, "Observation", codes=[f"http://loinc.org|{code}"])} == want
        assert store.search(pid, "Observation", codes=[f"http://snomed.info/sct|{code}"]) == []
        want = {r["id"] for r in obs if "2015-01-01" <= r["effectiveDateTime"][:10] <= "2016-12-31"}
        assert {r["id"] for r in store.search(pid, "Observation", date_from="2015", date_to="2016")} == want


def test_unknown_patient_is_one_clear_error(store):
    with pytest.raises(RecordError, match="no patient with id 'nobody'"):
        store.search("nobody", "Condition")


def test_reopen_and_add_more(index_path, tmp_path, synthea_dir):
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(index_path.read_bytes())
    before = SQLiteStore(copy).counts()
    build_index([sorted(synthea_dir.glob("*.json"))[0]], copy).close()  # re-adding replaces, never duplicates
    assert SQLiteStore(copy).counts() == before


# ---------------------------------------------------------------- small bundles written here


def _bundle(kind, *resources, urls=True):
    return {"resourceType": "Bundle", "type": kind,
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} if urls else {"resource": r} for r in resources]}


PATIENT = {"resourceType": "Patient", "id": "p-1", "name": [{"given": ["Ann"], "family": "Lee"}], "gender": "female"}
NPI = "http://hl7.org/fhir/sid/us-npi"
DOCTOR = {"resourceType": "Practitioner", "id": "doc-1", "identifier": [{"system": NPI, "value": "999"}],
          "name": [{"prefix": ["Dr."], "given": ["Bo"], "family": "Chen"}]}
ORG = {"resourceType": "Organization", "id": "org-1", "identifier": [{"system": "urn:x", "value": "o1"}], "name": "Clinic"}


def _request(rid="mr-1", requester="Practitioner?identifier=" + NPI + "|999"):
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                      "code": "1", "display": "Drug A"}]},
            "subject": {"reference": "urn:uuid:p-1"}, "authoredOn": "2020-01-02T00:00:00Z",
            "requester": {"reference": requester}}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_conditional_references_through_a_practitioner_bundle(tmp_path):
    """Newer Synthea: practitioners in their own bundle, referenced by identifier; ndjson and collection too."""
    _write(tmp_path / "practitionerInformation.json", _bundle("transaction", DOCTOR))
    _write(tmp_path / "hospitalInformation.json", _bundle("collection", ORG))
    _write(tmp_path / "patient.json", _bundle("transaction", PATIENT, _request()))
    cond = {"resourceType": "Condition", "id": "c-1", "subject": {"reference": "Patient/p-1"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]},
            "clinicalStatus": {"coding": [{"code": "active"}]}, "onsetDateTime": "2019-05-01"}
    (tmp_path / "more.ndjson").write_text(json.dumps(cond) + "\n\n")
    with open_store([tmp_path]) as s:
        [req] = s.search("p-1", "MedicationRequest")
        assert req["requester"]["reference"] == "Practitioner/doc-1"
        assert req["subject"]["reference"] == "Patient/p-1"
        assert [c["id"] for c in s.search("p-1", "Condition", codes=["44054006"])] == ["c-1"]
        assert s.read("Organization/org-1")["name"] == "Clinic"
        assert s.types("p-1") == ["Condition", "MedicationRequest"]


def test_organization_only_bundle_is_accepted(tmp_path):
    db = tmp_path / "x.sqlite"
    build_index([_write(tmp_path / "orgs.json", _bundle("transaction", ORG, DOCTOR))], db).close()
    assert SQLiteStore(db).counts() == {"Organization": 1, "Practitioner": 1}
    assert SQLiteStore(db).patients() == []


@pytest.mark.parametrize(
    "doc, message",
    [
        ("{not json", "not JSON"),
        ({"hello": 1}, "not a FHIR resource"),
        (_bundle("transaction", {"resourceType": "MedicationOrder", "id": "m"}), "FHIR DSTU2, not R4"),
        (_bundle("transaction", {"resourceType": "Condition", "id": "c", "clinicalStatus": "active"}), "STU3"),
        (_bundle("transaction", {"resourceType": "Encounter", "id": "e", "class": [{"code": "AMB"}]}), "R5"),
        (_bundle("transaction", {"resourceType": "Patient"}, urls=False), "has no valid id"),
        (_bundle("transaction", PATIENT, _request(requester="urn:uuid:missing")), "dangling reference 'urn:uuid:missing'"),
        (_bundle("transaction", PATIENT, _request()), "dangling reference 'Practitioner\\?identifier"),
    ],
)
def test_bad_bundles_fail_clearly_and_leave_the_index_unchanged(tmp_path, doc, message):
    db = tmp_path / "x.sqlite"
    build_index([_write(tmp_path / "good.json", _bundle("transaction", ORG))], db).close()
    bad = tmp_path / "bad.json"
    bad.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(RecordError, match=message) as info:
        build_index([bad, _write(tmp_path / "ok.json", _bundle("collection", {**ORG, "id": "org-2"}))], db)
    assert "bad.json" in str(info.value)
    assert SQLiteStore(db).counts() == {"Organization": 1}  # nothing of the failed load went in


def test_not_an_index_and_missing_paths(tmp_path):
    with pytest.raises(RecordError, match="no such file or folder"):
        open_store([tmp_path / "nope.json"])
    with pytest.raises(RecordError, match="not an SQLite index"):
        SQLiteStore(_write(tmp_path / "a.sqlite", {"x": 1}))
