"""The record store over a FHIR R4 REST server (HAPI, a hospital's endpoint), through `fhirpy`.

Searches are `Type?patient=ID` with `code=system|code` and the type's date parameter (`ge` / `le`), paged
through the bundle's `next` links; MedicationRequest asks `_include=MedicationRequest:medication` and keeps
the included Medications for `read`. An optional bearer token is sent with every request.

FHIR lets a server ignore search parameters it does not support (and minimal servers such as `fhirsnake`
ignore all of them), so every result is checked against the query here too: resources of another patient,
code or date are dropped, and the parameters the server ignored are listed in `ignored_parameters`.
Absolute references to the server's own base are made relative (`Type/id`), as the embedded store has them.
"""

from __future__ import annotations

from openmedgemma.ehr.bundles import _rewrite
from openmedgemma.ehr.fhir import CLINICAL_TYPES, code_matches, date_of, human_name, in_dates, patient_of
from openmedgemma.ehr.store import RecordStore
from openmedgemma.errors import RecordError

# The date search parameter of each type (FHIR R4 search parameter registry).
DATE_PARAMETERS = {
    "Observation": "date", "Condition": "onset-date", "MedicationRequest": "authoredon", "Immunization": "date",
    "Encounter": "date", "Procedure": "date", "DiagnosticReport": "date", "AllergyIntolerance": "date",
    "CarePlan": "date", "ImagingStudy": "started", "MedicationAdministration": "effective-time",
    "MedicationStatement": "effective", "ServiceRequest": "authored", "FamilyMemberHistory": "date",
}  # fmt: skip
MAX_PAGES = 10_000  # a server whose next links never end is an error, not a hang


class RestStore(RecordStore):
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, page_size: int = 200):
        from fhirpy import SyncFHIRClient

        self.source = self.base = url.rstrip("/")
        self.page_size = page_size
        self.client = SyncFHIRClient(self.base, authorization=f"Bearer {token}" if token else None,
                                     requests_config={"timeout": timeout})  # fmt: skip
        self._read_cache: dict[str, dict] = {}
        self._type_cache: dict[tuple[str, str], list[dict]] = {}  # unfiltered searches, per patient and type
        self.ignored_parameters: set[str] = set()

    # ------------------------------------------------------------------ HTTP

    def _get(self, path: str, params: dict | None = None):
        import requests
        from fhirpy.base.exceptions import AuthorizationError, OperationOutcome, ResourceNotFound

        try:
            return self.client.execute(path, method="get", params=params)
        except ResourceNotFound:
            return None
        except AuthorizationError:
            raise RecordError(f"{self.base}: the server refused the request (401; check --fhir-token)") from None
        except (OperationOutcome, ValueError) as err:
            raise RecordError(f"{self.base}/{path}: the server answered with an error ({str(err)[:300]})") from None
        except requests.RequestException as err:
            raise RecordError(f"{self.base}: FHIR server unreachable ({type(err).__name__})") from None

    def _pages(self, rtype: str, params: dict) -> list[dict]:
        """Every entry resource of the searchset, following `next` links; included ones go to the read cache."""
        bundle, found = self._get(rtype, {**params, "_count": self.page_size}), []
        for _ in range(MAX_PAGES):
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise RecordError(f"{self.base}/{rtype}: the server did not answer a search with a Bundle")
            for entry in bundle.get("entry") or []:
                resource = self._relative(dict(entry.get("resource") or {}))
                if resource.get("resourceType") == rtype and (entry.get("search") or {}).get("mode") != "include":
                    found.append(resource)
                elif resource.get("resourceType") and resource.get("id"):
                    self._read_cache[f"{resource['resourceType']}/{resource['id']}"] = resource
            nxt = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            if not nxt:
                return found
            bundle = self._get(nxt)
        raise RecordError(f"{self.base}/{rtype}: more than {MAX_PAGES} pages of results")

    def _relative(self, resource: dict) -> dict:
        prefix = self.base + "/"
        return _rewrite(resource, lambda ref: ref[len(prefix) :] if ref.startswith(prefix) else ref)

    # ------------------------------------------------------------------ the interface

    def patients(self) -> list[dict]:
        out = [{"id": r["id"], "name": human_name(r), "gender": r.get("gender", ""),
                "birthDate": r.get("birthDate", "")} for r in self._pages("Patient", {})]  # fmt: skip
        return sorted(out, key=lambda p: p["id"])

    def patient(self, patient_id: str) -> dict:
        resource = self.read(f"Patient/{patient_id}")
        if resource is None:
            raise RecordError(f"{self.base}: no patient with id {patient_id!r}")
        return resource

    def types(self, patient_id: str) -> list[str]:
        self.patient(patient_id)
        return [t for t in CLINICAL_TYPES if self.search(patient_id, t)]

    def search(self, patient_id, rtype, *, codes=None, date_from=None, date_to=None) -> list[dict]:
        cached = self._type_cache.get((patient_id, rtype))
        if cached is None:
            params: dict = {"patient": f"Patient/{patient_id}"}
            if codes:
                params["code"] = ",".join(codes)
            date_name = DATE_PARAMETERS.get(rtype)
            if date_name and (date_from or date_to):
                params[date_name] = [f"{op}{d}" for op, d in (("ge", date_from), ("le", date_to)) if d]
            if rtype == "MedicationRequest":
                params["_include"] = "MedicationRequest:medication"
            found = self._pages(rtype, params)
            self._note_ignored(found, patient_id, codes, date_from, date_to)
            if not (codes or date_from or date_to):
                self._type_cache[(patient_id, rtype)] = found
        else:
            found = cached
        keep = [r for r in found if patient_of(r) == patient_id and (not codes or code_matches(r, codes, self.read))
                and in_dates(date_of(r), date_from, date_to)]  # fmt: skip
        return sorted(keep, key=lambda r: (date_of(r) or "", r["id"]))

    def _note_ignored(self, found, patient_id, codes, date_from, date_to) -> None:
        if any(patient_of(r) != patient_id for r in found):
            self.ignored_parameters.add("patient")
        if codes and any(not code_matches(r, codes, self.read) for r in found):
            self.ignored_parameters.add("code")
        if (date_from or date_to) and any(not in_dates(date_of(r), date_from, date_to) for r in found):
            self.ignored_parameters.add("date")

    def read(self, key: str) -> dict | None:
        if key not in self._read_cache:
            resource = self._get(key)
            if resource is None:
                return None
            self._read_cache[key] = self._relative(dict(resource))
        return self._read_cache[key]
