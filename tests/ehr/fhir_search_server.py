"""A minimal FHIR R4 search server for the REST backend's paging, `_include` and bearer-token paths, which
fhirsnake (the installable server, see test_rest.py) does not implement.

It serves an embedded store over HTTP on 127.0.0.1 as a FHIR server would: `Type?patient=&code=&date=ge|le`
searches in pages of `_count` with absolute `next` links, `_include=MedicationRequest:medication` entries
marked `search.mode = include`, reads, absolute references (`{base}/Type/id`), 401 without the token, and a
count of the requests it answered.
"""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from openmedgemma.ehr.bundles import _rewrite


def make_app(store, token: str) -> FastAPI:
    app = FastAPI()
    app.state.requests = 0

    def absolute(resource: dict, base: str) -> dict:
        return _rewrite(resource, lambda ref: ref if ref.startswith("#") else f"{base}/{ref}")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        app.state.requests += 1
        if request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=401)
        return await call_next(request)

    @app.get("/{rtype}/{rid}")
    def read(rtype: str, rid: str, request: Request):
        resource = store.read(f"{rtype}/{rid}")
        if resource is None:
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
        return absolute(resource, str(request.base_url).rstrip("/"))

    @app.get("/{rtype}")
    def search(rtype: str, request: Request):
        base = str(request.base_url).rstrip("/")
        params = request.query_params
        patient = params.get("patient", "").removeprefix("Patient/")
        dates = params.getlist("date") + params.getlist("authoredon") + params.getlist("onset-date")
        date_from = next((d[2:] for d in dates if d.startswith("ge")), None)
        date_to = next((d[2:] for d in dates if d.startswith("le")), None)
        codes = [c for c in params.get("code", "").split(",") if c]
        if rtype == "Patient" and not patient:
            found = [store.patient(p["id"]) for p in store.patients()]
        else:
            found = store.search(patient, rtype, codes=codes or None, date_from=date_from, date_to=date_to)
        count, offset = int(params.get("_count", 50)), int(params.get("_offset", 0))
        page = found[offset : offset + count]
        entries = [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": absolute(r, base), "search": {"mode": "match"}}
                   for r in page]  # fmt: skip
        if params.get("_include") == "MedicationRequest:medication":
            for r in page:
                ref = (r.get("medicationReference") or {}).get("reference")
                if ref and store.read(ref):
                    entries.append({"resource": absolute(store.read(ref), base), "search": {"mode": "include"}})
        links = []
        if offset + count < len(found):
            query = "&".join(f"{k}={v}" for k, v in params.multi_items() if k != "_offset")
            links.append({"relation": "next", "url": f"{base}/{rtype}?{query}&_offset={offset + count}"})
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found), "link": links, "entry": entries}

    return app


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:port in a thread (started and stopped for real)."""

    def __init__(self, app: FastAPI, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the FHIR search server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
