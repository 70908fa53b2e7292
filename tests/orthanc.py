"""A real Orthanc PACS for tests and benchmarks: Debian's `orthanc` with its `orthanc-dicomweb` plugin.

Each server gets its own JSON config, a temporary storage folder and a free port on 127.0.0.1; its DICOM
(C-STORE) listener is off and remote access is refused (Orthanc 1.10 has no bind-address option: it
answers loopback clients only). HTTP basic authentication is on, with USER / PASSWORD.

    with Orthanc(tmp_path) as pacs:
        pacs.upload(paths)             # Orthanc's REST API: the files' bytes as they are
        pacs.stow(datasets)            # STOW-RS through dicomweb-client
        pacs.dicomweb_url              # http://127.0.0.1:PORT/dicom-web
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # where the Debian package puts it
USER, PASSWORD = "openmedgemma", "pacs-test-password"


def missing_reason() -> str | None:
    if not Path(ORTHANC).is_file():
        return "Orthanc not installed (apt-get install orthanc orthanc-dicomweb)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"Orthanc's DICOMweb plugin not found at {DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb)"
    return None


def require_orthanc() -> None:
    """Skip without Orthanc on a user's machine; with CI=true its absence is a failure (.ci/run installs it)."""
    reason = missing_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: .ci/run should have installed it)")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> Path:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "openmedgemma-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": 0,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpCompressionEnabled": False,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, attempts: int = 3, wait_s: float = 30.0) -> Orthanc:
        import requests

        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):  # another process may take the free port between probe and bind
            self.port = _free_port()
            log = open(self.folder / "orthanc.log", "wb")
            self.process = subprocess.Popen([ORTHANC, str(self._config())], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder)  # fmt: skip
            log.close()
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            self.stop()
        log_text = (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"Orthanc did not start; its log ends with:\n{log_text}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def upload(self, files) -> list[dict]:
        """POST each file's bytes to Orthanc's REST API (/instances): stored exactly as given."""
        import requests

        answers = []
        with requests.Session() as session:
            session.auth = (USER, PASSWORD)
            for path in files:
                response = session.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
                response.raise_for_status()
                answers.append(response.json())
        return answers

    def stow(self, datasets) -> None:
        """Store pydicom data sets through STOW-RS (dicomweb-client)."""
        import requests
        from dicomweb_client import DICOMwebClient

        with requests.Session() as session:
            session.auth = (USER, PASSWORD)
            DICOMwebClient(self.dicomweb_url, session=session).store_instances(list(datasets))
