"""EHR fixtures: the shared Synthea bundles, indexed once per session in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openmedgemma.ehr.sqlite import SQLiteStore, build_index


@pytest.fixture(scope="session")
def synthea_dir(shared_data) -> Path:
    path = shared_data / "synthea_fhir_r4"
    assert len(list(path.glob("*.json"))) == 25, f"{path}: expected the 25 Synthea bundles"
    return path


@pytest.fixture(scope="session")
def index_path(synthea_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ehr") / "records.sqlite"
    build_index([synthea_dir], path).close()
    return path


@pytest.fixture(scope="session")
def store(index_path):
    with SQLiteStore(index_path) as s:
        yield s


@pytest.fixture(scope="session")
def raw_bundles(synthea_dir) -> dict[str, dict]:
    """file name -> the bundle as plain JSON (the independent side of every comparison)."""
    return {p.name: json.loads(p.read_text()) for p in sorted(synthea_dir.glob("*.json"))}


@pytest.fixture(scope="session")
def raw(raw_bundles):
    return RawRecords(raw_bundles)


class RawRecords:
    """The bundles read directly: resources by key, each with its patient, references followed by fullUrl."""

    def __init__(self, bundles: dict[str, dict]):
        self.by_url, self.resources = {}, {}
        for bundle in bundles.values():
            for entry in bundle["entry"]:
                res = entry["resource"]
                self.by_url[entry["fullUrl"]] = res
                self.resources[(res["resourceType"], res["id"])] = res

    def follow(self, reference: str) -> dict:
        return self.by_url[reference]

    def patient_id(self, res: dict) -> str | None:
        if res["resourceType"] == "Patient":
            return res["id"]
        for key in ("subject", "patient"):
            if key in res:
                return self.follow(res[key]["reference"])["id"]
        return None

    def of(self, patient_id: str, rtype: str) -> list[dict]:
        return [r for (t, _), r in self.resources.items() if t == rtype and self.patient_id(r) == patient_id]
