"""The record-store interface the tools read from, and `open_store` to pick a backend.

Two backends answer the same queries with the same resources (references as literal `Type/id`):
`SQLiteStore` (sqlite.py, an on-disk index of FHIR bundles: the default) and `RestStore` (rest.py, a FHIR
R4 server such as HAPI or a hospital's endpoint).
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from pathlib import Path

from openmedgemma.errors import RecordError


class RecordStore(ABC):
    """Read-only access to patients' FHIR resources. Results are sorted by date, then by id."""

    source: str  # what the store reads (file or URL), for messages

    @abstractmethod
    def patients(self) -> list[dict]:
        """One dict per patient: id, name, gender, birthDate."""

    @abstractmethod
    def patient(self, patient_id: str) -> dict:
        """The Patient resource; RecordError naming the id when there is none."""

    @abstractmethod
    def types(self, patient_id: str) -> list[str]:
        """The clinical resource types (fhir.CLINICAL_TYPES, in that order; billing types are left out) that
        hold at least one resource of the patient."""

    @abstractmethod
    def search(self, patient_id: str, rtype: str, *, codes: list[str] | None = None,
               date_from: str | None = None, date_to: str | None = None) -> list[dict]:  # fmt: skip
        """The patient's resources of `rtype`, filtered by codes ("code" or "system|code") and ISO dates."""

    @abstractmethod
    def read(self, key: str) -> dict | None:
        """The resource `Type/id` (a Practitioner, a Medication...), or None."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def open_store(records: str | Path | list, *, token: str | None = None, progress: bool = False) -> RecordStore:
    """A store for `records`: an index file made by `openmedgemma ehr index`, a FHIR server URL
    (http/https; `token` is sent as a bearer token), or bundle files / folders (indexed in memory)."""
    items = [records] if isinstance(records, (str, Path)) else list(records)
    if len(items) == 1 and str(items[0]).startswith(("http://", "https://")):
        from openmedgemma.ehr.rest import RestStore

        return RestStore(str(items[0]), token=token)
    if len(items) == 1 and is_sqlite(Path(items[0])):
        from openmedgemma.ehr.sqlite import SQLiteStore

        return SQLiteStore(items[0])
    from openmedgemma.ehr.sqlite import SQLiteStore, build_index

    try:
        return SQLiteStore(build_index(items, ":memory:", progress=progress))
    except sqlite3.Error as err:  # pragma: no cover - sqlite itself failing
        raise RecordError(f"cannot index {items}: {err}") from None
