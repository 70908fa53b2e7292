"""The embedded record store: FHIR bundles indexed in one SQLite file (stdlib `sqlite3`).

Tables: `resources` (type, id, patient, date, source file, the resource as JSON with references resolved),
`codes` (patient, type, id, system, code, display, date: what the manifest and code filters read) and
`identifiers` (for conditional references when more bundles are added later). Indexed by patient + type +
date and patient + type + code. Building runs in one transaction: a load that fails leaves the file as it
was. Reopening is a plain connect.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from openmedgemma.ehr.bundles import bundle_files, load_bundles
from openmedgemma.ehr.fhir import CLINICAL_TYPES, code_matches, codings_of, date_of, human_name, in_dates, patient_of
from openmedgemma.ehr.store import RecordStore, is_sqlite
from openmedgemma.errors import RecordError

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS resources (
    rtype TEXT NOT NULL, id TEXT NOT NULL, patient TEXT, date TEXT, source TEXT, json TEXT NOT NULL,
    PRIMARY KEY (rtype, id));
CREATE INDEX IF NOT EXISTS resources_by_patient ON resources (patient, rtype, date);
CREATE TABLE IF NOT EXISTS codes (
    patient TEXT, rtype TEXT NOT NULL, id TEXT NOT NULL, system TEXT, code TEXT, display TEXT, date TEXT);
CREATE INDEX IF NOT EXISTS codes_by_patient ON codes (patient, rtype, code);
CREATE INDEX IF NOT EXISTS codes_by_resource ON codes (rtype, id);
CREATE TABLE IF NOT EXISTS identifiers (rtype TEXT, system TEXT, value TEXT, id TEXT);
CREATE INDEX IF NOT EXISTS identifiers_by_value ON identifiers (rtype, value);
"""


def build_index(paths: Iterable[str | Path], db: str | Path, *, progress: bool = False) -> sqlite3.Connection:
    """Index the bundles `paths` into `db` (a file, created or added to; or ":memory:"); the open connection.

    Everything is read and resolved before the first row is written, and the rows go in one transaction.
    """
    paths = list(paths)
    if str(db) != ":memory:" and Path(db).exists() and not is_sqlite(Path(db)):
        raise RecordError(f"{db}: exists and is not an SQLite index; choose another --db path")
    conn = _connect(db)
    conn.executescript(SCHEMA)

    def known(key: str) -> bool:
        rtype, _, rid = key.partition("/")
        return conn.execute("SELECT 1 FROM resources WHERE rtype=? AND id=?", (rtype, rid)).fetchone() is not None

    def find_identifier(rtype: str, system: str, value: str) -> str | None:
        row = conn.execute("SELECT id FROM identifiers WHERE rtype=? AND value=? AND (system=? OR ?='')",
                           (rtype, value, system, system)).fetchone()  # fmt: skip
        return row[0] if row else None

    from tqdm import tqdm

    files = bundle_files(paths)
    with tqdm(total=len(files), desc="reading bundles", unit="file", disable=not progress) as bar:
        loaded = load_bundles(files, known=known, find_identifier=find_identifier, progress=bar.update)
    by_key = {item.key: item.resource for item in loaded}

    def read(key: str) -> dict | None:  # a Medication behind a medicationReference: this load, or indexed before
        if key in by_key:
            return by_key[key]
        rtype, _, rid = key.partition("/")
        row = conn.execute("SELECT json FROM resources WHERE rtype=? AND id=?", (rtype, rid)).fetchone()
        return json.loads(row[0]) if row else None

    with conn:  # one transaction: all or nothing
        for item in tqdm(loaded, desc="indexing", unit="res", disable=not progress):
            res = item.resource
            rtype, rid = res["resourceType"], res["id"]
            patient, date = patient_of(res), date_of(res)
            conn.execute("DELETE FROM codes WHERE rtype=? AND id=?", (rtype, rid))
            conn.execute("DELETE FROM identifiers WHERE rtype=? AND id=?", (rtype, rid))
            conn.execute(
                "INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?)",
                (rtype, rid, patient, date, item.source, json.dumps(res, ensure_ascii=False, separators=(",", ":"))),
            )
            conn.executemany(
                "INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(patient, rtype, rid, system, code, display, date) for system, code, display in codings_of(res, read)],
            )
            conn.executemany(
                "INSERT INTO identifiers VALUES (?, ?, ?, ?)",
                [(rtype, i.get("system", ""), i["value"], rid) for i in res.get("identifier") or []
                 if isinstance(i, dict) and i.get("value")],
            )  # fmt: skip
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
    return conn


def _connect(db: str | Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(db), check_same_thread=False)
        conn.execute("PRAGMA journal_mode=DELETE")
        return conn
    except sqlite3.Error as err:
        raise RecordError(f"{db}: cannot open as an SQLite index ({err})") from None


class SQLiteStore(RecordStore):
    """Queries an index made by `build_index` (a path, or an open connection)."""

    def __init__(self, db: str | Path | sqlite3.Connection):
        if isinstance(db, sqlite3.Connection):
            self.conn, self.source = db, "(in-memory index)"
        else:
            path = Path(db)
            if not is_sqlite(path):
                raise RecordError(f"{path}: not an SQLite index (make one with `openmedgemma ehr index`)")
            self.conn, self.source = _connect(path), str(path)
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.Error:
            row = None
        if row is None or row[0] != SCHEMA_VERSION:
            raise RecordError(f"{self.source}: not an openmedgemma EHR index of schema {SCHEMA_VERSION}; rebuild it "
                              "with `openmedgemma ehr index`")  # fmt: skip

    def close(self) -> None:
        self.conn.close()

    def patients(self) -> list[dict]:
        rows = self.conn.execute("SELECT json FROM resources WHERE rtype='Patient' ORDER BY id").fetchall()
        out = []
        for (text,) in rows:
            res = json.loads(text)
            out.append({"id": res["id"], "name": human_name(res), "gender": res.get("gender", ""),
                        "birthDate": res.get("birthDate", "")})  # fmt: skip
        return out

    def patient(self, patient_id: str) -> dict:
        res = self.read(f"Patient/{patient_id}")
        if res is None:
            raise RecordError(f"{self.source}: no patient with id {patient_id!r} (see `openmedgemma ehr patients`)")
        return res

    def types(self, patient_id: str) -> list[str]:
        self.patient(patient_id)
        rows = self.conn.execute("SELECT DISTINCT rtype FROM resources WHERE patient=?", (patient_id,)).fetchall()
        return [t for t in CLINICAL_TYPES if (t,) in rows]

    def search(self, patient_id, rtype, *, codes=None, date_from=None, date_to=None) -> list[dict]:
        self.patient(patient_id)
        sql, args = "SELECT json FROM resources WHERE patient=? AND rtype=?", [patient_id, rtype]
        if codes:  # the code index narrows the rows; code_matches applies the system part exactly
            bare = sorted({c.rpartition("|")[2] for c in codes})
            sql += f" AND id IN (SELECT id FROM codes WHERE rtype=? AND code IN ({','.join('?' * len(bare))}))"
            args += [rtype, *bare]
        rows = self.conn.execute(sql + " ORDER BY date, id", args).fetchall()
        out = [json.loads(text) for (text,) in rows]
        return [r for r in out if (not codes or code_matches(r, codes, self.read))
                and in_dates(date_of(r), date_from, date_to)]  # fmt: skip

    def read(self, key: str) -> dict | None:
        rtype, _, rid = key.partition("/")
        row = self.conn.execute("SELECT json FROM resources WHERE rtype=? AND id=?", (rtype, rid)).fetchone()
        return json.loads(row[0]) if row else None

    def counts(self) -> dict[str, int]:
        """Resources per type in the whole index."""
        rows = self.conn.execute("SELECT rtype, COUNT(*) FROM resources GROUP BY rtype").fetchall()
        return dict(sorted(rows))
