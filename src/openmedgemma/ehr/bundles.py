"""Reading FHIR R4 files and resolving their references.

Accepted: a Bundle of any type (transaction, batch, collection, searchset, document...), a single resource,
or NDJSON (one resource or bundle per line), one or many files. References are rewritten to the literal
`Type/id` form a FHIR server would store after a transaction:

- `urn:uuid:...` / `urn:oid:...` / absolute URLs: through the `fullUrl` of an entry in any loaded file;
- conditional references (`Practitioner?identifier=system|value`, as newer Synthea writes them): through
  the identifiers of every loaded resource (and, when adding to an index, those already indexed);
- contained (`#id`) references are left as they are.

A reference that resolves to nothing is an error (`DataError` naming the file, the resource and the
reference), as is a file that is not JSON, not FHIR, or not R4 (see `check_r4`), and a resource without
an id. Nothing is returned until every file has been read, so the caller never indexes half a load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmedgemma.errors import RecordError as DataError  # a DataError about FHIR records

# Resource types that do not exist in R4 (so the file is DSTU2 / STU3 / R5), with the version they betray.
NOT_R4_TYPES = {
    "MedicationOrder": "DSTU2", "DiagnosticOrder": "DSTU2", "DeviceUseRequest": "DSTU2", "Order": "DSTU2",
    "ProcedureRequest": "STU3", "ReferralRequest": "STU3", "BodySite": "STU3", "DataElement": "STU3",
    "MedicationUsage": "R5", "InventoryItem": "R5", "Transport": "R5", "Requirements": "R5",
}  # fmt: skip
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR id datatype
_LITERAL = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


@dataclass
class LoadedResource:
    resource: dict  # references rewritten to Type/id
    source: str  # file name the resource came from (not its full path)

    @property
    def key(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def check_r4(resource: dict, where: str) -> None:
    """Raise DataError when `resource` is visibly not FHIR R4 (DSTU2 / STU3 / R5 structures)."""
    rtype = resource["resourceType"]
    if rtype in NOT_R4_TYPES:
        raise DataError(f"{where}: resource type {rtype} is FHIR {NOT_R4_TYPES[rtype]}, not R4")
    if rtype in ("Condition", "AllergyIntolerance") and isinstance(resource.get("clinicalStatus"), str):
        raise DataError(f"{where}: {rtype}.clinicalStatus is a plain code (FHIR DSTU2/STU3); R4 has a CodeableConcept")
    if rtype == "Encounter" and isinstance(resource.get("class"), list):
        raise DataError(f"{where}: Encounter.class is a list (FHIR R5); R4 has one Coding")
    if rtype in ("MedicationRequest", "MedicationStatement") and "medication" in resource:
        raise DataError(f"{where}: {rtype}.medication is a CodeableReference (FHIR R5); R4 has medication[x]")


def _entries(path: Path) -> Iterator[tuple[dict, str | None, str]]:
    """(resource, fullUrl, where) for each resource of one file; bundles are unpacked."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _fail(path, f"cannot read ({err.strerror or err})") from None
    if path.suffix.lower() == ".ndjson":
        docs = []
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                docs.append((_parse_json(line, path, f" line {number}"), f"{path.name} line {number}"))
    else:
        docs = [(_parse_json(raw, path, ""), path.name)]
    for doc, where in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            raise DataError(f"{where}: not a FHIR resource (no resourceType)")
        if doc["resourceType"] != "Bundle":
            yield doc, None, where
            continue
        entries = doc.get("entry", [])
        if not isinstance(entries, list):
            raise DataError(f"{where}: Bundle.entry is not a list")
        for index, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise DataError(f"{where}: Bundle.entry[{index}] has no resource with a resourceType")
            yield resource, entry.get("fullUrl"), f"{where} entry[{index}]"


def _parse_json(raw: bytes | str, path: Path, line: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not JSON{line} ({err})") from None


def bundle_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named (folders: their *.json and *.ndjson, sorted); a clear error for a missing path."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".ndjson") and p.is_file())
            if not found:
                raise DataError(f"{path}: no .json or .ndjson files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no FHIR files given")
    return files


def load_bundles(
    paths: Iterable[str | Path],
    *,
    known: Callable[[str], bool] = lambda key: False,
    find_identifier: Callable[[str, str, str], str | None] = lambda rtype, system, value: None,
    progress: Callable[[int], None] | None = None,
) -> list[LoadedResource]:
    """Every resource of the files, references rewritten to `Type/id`.

    `known(Type/id)` and `find_identifier(type, system, value) -> id` let references point at resources
    indexed earlier (the store passes its own lookups). `progress(n)` is called after each file.
    """
    files = bundle_files(paths)
    loaded: list[tuple[dict, str, str]] = []  # resource, where, file name
    by_url: dict[str, str] = {}
    by_identifier: dict[tuple[str, str, str], str] = {}
    keys: set[str] = set()
    for path in files:
        for resource, full_url, where in _entries(path):
            rid = resource.get("id")
            if not isinstance(rid, str) or not _ID.match(rid):
                if rid is None and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                    rid = full_url[len("urn:uuid:") :]  # a transaction entry may leave the id to the server
                else:
                    raise DataError(f"{where}: {resource['resourceType']} has no valid id ({rid!r})")
                if not _ID.match(rid):
                    raise DataError(f"{where}: {resource['resourceType']} has no valid id ({rid!r})")
                resource = {**resource, "id": rid}
            check_r4(resource, where)
            key = f"{resource['resourceType']}/{rid}"
            keys.add(key)
            if full_url:
                by_url[full_url] = key
            for ident in resource.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    by_identifier[(resource["resourceType"], ident.get("system", ""), ident["value"])] = rid
            loaded.append((resource, where, path.name))
        if progress:
            progress(1)

    def resolve(ref: str, where: str) -> str:
        if ref.startswith("#"):
            return ref
        if ref in by_url:
            return by_url[ref]
        if "?" in ref:
            return f"{ref.split('?', 1)[0]}/{_conditional(ref, where)}"
        match = _LITERAL.match(ref) or _LITERAL.match("/".join(ref.rstrip("/").split("/")[-2:]))
        if match and not ref.startswith("urn:"):
            key = f"{match.group(1)}/{match.group(2)}"
            if key in keys or known(key):
                return key
        raise DataError(f"{where}: dangling reference {ref!r} (no loaded resource has this fullUrl or id)")

    def _conditional(ref: str, where: str) -> str:
        rtype, query = ref.split("?", 1)
        name, _, value = query.partition("=")
        if name != "identifier" or not value:
            raise DataError(f"{where}: conditional reference {ref!r}: only ?identifier=[system|]value is supported")
        system, _, code = value.rpartition("|")
        rid = by_identifier.get((rtype, system, code)) or find_identifier(rtype, system, code)
        if rid is None and not system:
            hits = {v for (t, _s, c), v in by_identifier.items() if t == rtype and c == code}
            rid = hits.pop() if len(hits) == 1 else None
        if rid is None:
            raise DataError(f"{where}: dangling reference {ref!r} (no {rtype} with that identifier is loaded; load "
                            "the organization / practitioner bundles too)")  # fmt: skip
        return rid

    out = []
    for resource, where, name in loaded:
        out.append(LoadedResource(_rewrite(resource, lambda ref: resolve(ref, where)), name))
    return out


def _rewrite(node: Any, resolve: Callable[[str], str]) -> Any:
    """A copy of `node` with every `reference` string passed through `resolve` (inputs are never modified)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out[key] = resolve(value) if key == "reference" and isinstance(value, str) else _rewrite(value, resolve)
        return out
    if isinstance(node, list):
        return [_rewrite(v, resolve) for v in node]
    return node
