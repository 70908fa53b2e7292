"""The tools the model reads the record through: condensed, citable text.

- `get_patient_manifest(patient_id)`: per resource type, each code's display, system and code, how many
  resources carry it and their date range, so that a long record fits in the context as a table of contents.
- `get_patient_fhir_resource(patient_id, fhir_resource, filter_code, date_from, date_to)`: the resources of
  one type, condensed (see `condense`), one per line, each starting with its `Type/id`.
- `get_patient_demographics(patient_id)`: name, gender, birth date (age), deceased, address city / state.

`condense` keeps every fact and its unit and date: it drops `meta`, narrative `text`, identifiers,
extensions, the patient reference and empty fields; writes a CodeableConcept as "display [SYSTEM code]",
a Quantity as "value unit", and a reference as "Type/id (what it is)" so that the prescriber's name, a
medication's name or the reason's condition is readable without another call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from openmedgemma.ehr.fhir import (
    CLINICAL_TYPES, SYSTEM_NAMES, codings_of, concept_text, date_of, human_name, label_of, system_name,
)  # fmt: skip
from openmedgemma.ehr.store import RecordStore
from openmedgemma.errors import RecordError

_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
DROPPED = {"meta", "text", "identifier", "extension", "modifierExtension", "resourceType", "id", "fullUrl", "search",
           "subject", "patient", "beneficiary", "contained"}  # fmt: skip
DROPPED_BY_TYPE = {"Observation": {"issued"}, "DiagnosticReport": {"issued"}}


def _number(value: float | int) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _concept(concept: dict) -> str:
    # codes of well-known systems only: a local system's URL would cost more tokens than it says
    codes = "; ".join(f"{SYSTEM_NAMES[c['system']]} {c['code']}" for c in concept.get("coding") or []
                      if isinstance(c, dict) and c.get("code") and c.get("system") in SYSTEM_NAMES)  # fmt: skip
    text = concept_text(concept)
    return f"{text} [{codes}]" if codes else text


class Condenser:
    """Condensed views of resources; reference displays are looked up in the store once and remembered."""

    def __init__(self, store: RecordStore):
        self.store = store
        self._names: dict[str, str] = {}

    def reference(self, ref: str) -> str:
        if ref not in self._names:
            resource = self.store.read(ref) if "/" in ref and not ref.startswith("#") else None
            name = ""
            if resource is not None:
                rtype = resource["resourceType"]
                if rtype in ("Practitioner", "Patient", "RelatedPerson"):
                    name = human_name(resource)
                elif rtype in ("Organization", "Location"):
                    name = resource.get("name", "")
                else:
                    name = label_of(resource, self.store.read)
                    date = date_of(resource)
                    name = f"{name}, {date[:10]}" if date and rtype == "Encounter" else name
            self._names[ref] = f"{ref} ({name})" if name else ref
        return self._names[ref]

    def value(self, node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                return self.reference(node["reference"])
            if "coding" in node or (set(node) == {"text"}):
                return _concept(node)
            if "value" in node and ("unit" in node or "code" in node) and isinstance(node["value"], (int, float)):
                return f"{_number(node['value'])} {node.get('unit') or node.get('code')}"
            if "code" in node and "system" in node:  # a bare Coding
                return _concept({"coding": [node]}) or str(node["code"])
            out = {k: self.value(v) for k, v in node.items() if k not in ("extension", "modifierExtension", "id")}
            return {k: v for k, v in out.items() if v not in (None, "", [], {})}
        if isinstance(node, list):
            items = [self.value(v) for v in node]
            return [v for v in items if v not in (None, "", [], {})]
        return _number(node) if isinstance(node, float) else node

    def condense(self, resource: dict) -> dict:
        """{"ref": "Type/id", ...the remaining facts...}."""
        dropped = DROPPED | DROPPED_BY_TYPE.get(resource["resourceType"], set())
        body = self.value({k: v for k, v in resource.items() if k not in dropped})
        return {"ref": f"{resource['resourceType']}/{resource['id']}", **body}

    def line(self, resource: dict) -> str:
        return json.dumps(self.condense(resource), ensure_ascii=False, separators=(", ", ": "))


@dataclass
class ToolResult:
    name: str
    arguments: dict
    text: str  # what the model reads
    refs: list[str] = field(default_factory=list)  # the Type/id of every resource in the text
    error: str | None = None


TOOL_SCHEMAS = [
    {"type": "function", "function": {
        "name": "get_patient_manifest",
        "description": "Table of contents of the patient's record: per FHIR resource type, the codes present "
                       "with their display names, counts and date ranges.",
        "parameters": {"type": "object", "properties": {"patient_id": {"type": "string"}}, "required": ["patient_id"]},
    }},
    {"type": "function", "function": {
        "name": "get_patient_fhir_resource",
        "description": "The patient's resources of one FHIR type, condensed, one per line starting with its "
                       "Type/id, optionally only those with the given codes and within the given dates.",
        "parameters": {"type": "object", "properties": {
            "patient_id": {"type": "string"},
            "fhir_resource": {"type": "string", "description": "a resource type from the manifest"},
            "filter_code": {"type": "string", "description": "comma-separated codes from the manifest; empty for all"},
            "date_from": {"type": "string", "description": "YYYY or YYYY-MM-DD, inclusive"},
            "date_to": {"type": "string", "description": "YYYY or YYYY-MM-DD, inclusive"},
        }, "required": ["patient_id", "fhir_resource"]},
    }},
    {"type": "function", "function": {
        "name": "get_patient_demographics",
        "description": "The patient's name, gender, birth date, age or date of death, and city.",
        "parameters": {"type": "object", "properties": {"patient_id": {"type": "string"}}, "required": ["patient_id"]},
    }},
]  # fmt: skip
TOOL_NAMES = [t["function"]["name"] for t in TOOL_SCHEMAS]


class Tools:
    """The three tools over one store. `call` never raises for a bad argument: the error is the result text,
    so that a model can read it (and the trace records it)."""

    def __init__(self, store: RecordStore):
        self.store = store
        self.condenser = Condenser(store)

    def call(self, name: str, arguments: dict) -> ToolResult:
        method = {"get_patient_manifest": self.manifest, "get_patient_fhir_resource": self.resources,
                  "get_patient_demographics": self.demographics}.get(name)  # fmt: skip
        if method is None:
            text = f"error: unknown tool {name!r}; tools: {TOOL_NAMES}"
            return ToolResult(name, arguments, text, error="unknown tool")
        try:
            return method(**arguments)
        except TypeError as err:
            return ToolResult(name, arguments, f"error: bad arguments for {name}: {err}", error="bad arguments")
        except RecordError as err:
            return ToolResult(name, arguments, f"error: {err}", error=str(err))

    def manifest_rows(self, patient_id: str) -> dict[str, list[dict]]:
        """{type: [{"code", "system", "display", "count", "first", "last"}]} (codes by count, then display)."""
        out: dict[str, list[dict]] = {}
        for rtype in self.store.types(patient_id):
            rows: dict[tuple, dict] = {}
            for resource in self.store.search(patient_id, rtype):
                date = (date_of(resource) or "")[:10]
                for system, code, display in codings_of(resource, self.store.read)[:1] or [("", "", "(no code)")]:
                    row = rows.setdefault((system, code, display), {"code": code, "system": system_name(system),
                                          "display": display, "count": 0, "first": date, "last": date})  # fmt: skip
                    row["count"] += 1
                    if date:
                        row["first"] = min(row["first"] or date, date)
                        row["last"] = max(row["last"], date)
            out[rtype] = sorted(rows.values(), key=lambda r: (-r["count"], r["display"]))
        return out

    def manifest(self, patient_id: str, only: list[str] | None = None) -> ToolResult:
        lines = []
        for rtype, rows in self.manifest_rows(patient_id).items():
            if only and rtype not in only:
                continue
            total = sum(r["count"] for r in rows)
            lines.append(f"{rtype} ({total}):")
            for r in rows:
                span = r["first"] if r["first"] == r["last"] else f"{r['first']}..{r['last']}"
                lines.append(f"  {r['code'] or '-'} {r['display']} [{r['system']}] x{r['count']} {span}".rstrip())
        return ToolResult("get_patient_manifest", {"patient_id": patient_id}, "\n".join(lines) or "(empty record)")

    def resources(self, patient_id: str, fhir_resource: str, filter_code: str | list | None = None,
                  date_from: str | None = None, date_to: str | None = None) -> ToolResult:  # fmt: skip
        if fhir_resource not in CLINICAL_TYPES:
            raise RecordError(f"fhir_resource {fhir_resource!r} is not one of {', '.join(CLINICAL_TYPES)}")
        for name, value in (("date_from", date_from), ("date_to", date_to)):
            if value and not _DATE.match(str(value)):
                raise RecordError(f"{name} {value!r} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)")
        codes = filter_code if isinstance(filter_code, list) else str(filter_code or "").split(",")
        codes = [str(c).strip() for c in codes if str(c).strip()]
        args = {"patient_id": patient_id, "fhir_resource": fhir_resource, "filter_code": ",".join(codes),
                "date_from": date_from or "", "date_to": date_to or ""}  # fmt: skip
        found = self.store.search(patient_id, fhir_resource, codes=codes or None, date_from=date_from or None,
                                  date_to=date_to or None)  # fmt: skip
        lines = [self.condenser.line(r) for r in found]
        text = "\n".join(lines) if lines else f"(no {fhir_resource} resources match)"
        return ToolResult("get_patient_fhir_resource", args, text, [f"{r['resourceType']}/{r['id']}" for r in found])

    def demographics(self, patient_id: str) -> ToolResult:
        p = self.store.patient(patient_id)
        facts = {"ref": f"Patient/{p['id']}", "name": human_name(p), "gender": p.get("gender", ""),
                 "birthDate": p.get("birthDate", "")}  # fmt: skip
        if p.get("deceasedDateTime") or p.get("deceasedBoolean"):
            facts["deceased"] = p.get("deceasedDateTime") or True
        if p.get("maritalStatus"):
            facts["maritalStatus"] = concept_text(p["maritalStatus"])
        address = (p.get("address") or [{}])[0]
        if address.get("city") or address.get("state"):
            facts["city"] = ", ".join(x for x in (address.get("city"), address.get("state")) if x)
        text = json.dumps(facts, ensure_ascii=False)
        return ToolResult("get_patient_demographics", {"patient_id": patient_id}, text, [facts["ref"]])


def record_text(tools: Tools, patient_id: str) -> tuple[str, list[str]]:
    """The whole record, condensed, as plain text (demographics, then each type's lines); and its refs."""
    demo = tools.demographics(patient_id)
    parts, refs = [f"Patient: {demo.text}"], list(demo.refs)
    for rtype in tools.store.types(patient_id):
        result = tools.resources(patient_id, rtype)
        parts.append(f"\n{rtype}:\n{result.text}")
        refs.extend(result.refs)
    return "\n".join(parts), refs
