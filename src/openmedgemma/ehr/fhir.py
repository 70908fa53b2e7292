"""What the store, the tools and the question generator read off a FHIR R4 resource: its patient, its date
and its codes. One place, so that an index, a tool result and a ground-truth answer agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The element holding "the" code of each clinical type (what the manifest lists and `filter_code` matches).
CODE_ELEMENTS = {
    "Condition": "code", "Observation": "code", "Procedure": "code", "AllergyIntolerance": "code",
    "DiagnosticReport": "code", "ServiceRequest": "code", "Immunization": "vaccineCode", "Encounter": "type",
    "MedicationRequest": "medicationCodeableConcept", "MedicationStatement": "medicationCodeableConcept",
    "MedicationAdministration": "medicationCodeableConcept", "MedicationDispense": "medicationCodeableConcept",
    "Medication": "code", "CarePlan": "category", "CareTeam": "category", "Device": "type",
    "FamilyMemberHistory": "relationship", "ImagingStudy": "procedureCode", "Goal": "description",
}  # fmt: skip

# The clinically relevant date of each type, first match wins (start of a period).
DATE_ELEMENTS = (
    "effectiveDateTime", "effectivePeriod", "onsetDateTime", "onsetPeriod", "authoredOn", "occurrenceDateTime",
    "performedDateTime", "performedPeriod", "period", "recordedDate", "started", "issued", "billablePeriod",
    "created", "date", "birthDate",
)  # fmt: skip

PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")

SYSTEM_NAMES = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
}

# Types the navigator looks at (Google's list, plus Immunization and Procedure-like Synthea types).
CLINICAL_TYPES = (
    "Encounter", "Condition", "Observation", "AllergyIntolerance", "FamilyMemberHistory", "MedicationRequest",
    "MedicationStatement", "MedicationAdministration", "DiagnosticReport", "Procedure", "ServiceRequest",
    "Immunization", "CarePlan", "ImagingStudy", "Device", "Goal",
)  # fmt: skip


def system_name(system: str | None) -> str:
    return SYSTEM_NAMES.get(system or "", system or "")


def patient_of(resource: dict) -> str | None:
    """The id of the patient a resource belongs to (its own id for a Patient), or None."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for name in PATIENT_ELEMENTS:
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith("Patient/"):
            return ref["reference"].split("/", 1)[1]
    return None


def date_of(resource: dict) -> str | None:
    """The resource's clinical date as an ISO string (a period's start), or None."""
    for name in DATE_ELEMENTS:
        value = resource.get(name)
        if isinstance(value, dict):
            value = value.get("start") or value.get("end")
        if isinstance(value, str) and value:
            return value
    return None


def codings_of(resource: dict, read: Callable[[str], dict | None] | None = None) -> list[tuple[str, str, str]]:
    """(system, code, display) of the resource's main code (CODE_ELEMENTS); a text-only concept: ("", "", text).
    A medication given by `medicationReference` has the referenced Medication's code, read through `read`."""
    ref = (resource.get("medicationReference") or {}).get("reference")
    if ref and read is not None and not resource.get("medicationCodeableConcept"):
        medication = read(ref)
        return codings_of(medication) if medication else []
    element = resource.get(CODE_ELEMENTS.get(resource.get("resourceType", ""), "code"))
    concepts = element if isinstance(element, list) else [element]
    out = []
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        codings = [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]
        if not codings and concept.get("text"):
            out.append(("", "", str(concept["text"])))
        for c in codings:
            out.append((c.get("system", ""), str(c["code"]), c.get("display") or concept.get("text") or ""))
    return out


def label_of(resource: dict, read: Callable[[str], dict | None] | None = None) -> str:
    """The display of the resource's main code (first coding), or "" when it has none."""
    codings = codings_of(resource, read)
    return codings[0][2] if codings else ""


def concept_text(concept: Any) -> str:
    """A CodeableConcept / Coding as plain text: its text or first display."""
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    if concept.get("display"):
        return str(concept["display"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("display"):
            return str(coding["display"])
    return ""


def human_name(resource: dict) -> str:
    """'Prefix Given Family' of a Patient / Practitioner's first name entry."""
    for name in resource.get("name") or []:
        if isinstance(name, dict):
            parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
            text = name.get("text") or " ".join(p for p in parts if p)
            if text:
                return text
    return resource.get("name") if isinstance(resource.get("name"), str) else ""


def code_matches(resource: dict, codes: list[str], read: Callable[[str], dict | None] | None = None) -> bool:
    """Does any of `codes` ("code" or "system|code") match a coding of the resource's main code?"""
    for system, code, _display in codings_of(resource, read):
        for wanted in codes:
            want_system, bar, want_code = wanted.rpartition("|")
            if want_code == code and (not bar or want_system == system):
                return True
    return False


def in_dates(date: str | None, date_from: str | None, date_to: str | None) -> bool:
    """Is the ISO `date` within [date_from, date_to] (inclusive, compared at the bounds' precision)?"""
    if not date_from and not date_to:
        return True
    if not date:
        return False
    if date_from and date[: len(date_from)] < date_from:
        return False
    return not (date_to and date[: len(date_to)] > date_to)
