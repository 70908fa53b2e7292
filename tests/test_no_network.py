"""No network calls at run time: `ask`, `eval` and `train` run with every non-loopback socket and name lookup
refused and recorded (tests/netguard.py), on the committed nano models and the shared data, and try nothing.

`ask` is here; `eval` (chat and embedding tasks) and `train` run under the same guard in
tests/test_privacy_and_inputs.py, which drives them on real files once for both checks."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from openmedgemma.cli import main
from tests.netguard import is_loopback, network_blocked

ROOT = Path(__file__).resolve().parents[1]
NANO_GEMMA, NANO_SIGLIP = ROOT / "models" / "medgemma-nano", ROOT / "models" / "medsiglip-nano"


def test_the_guard_refuses_and_records_all_but_loopback():
    """The guard itself: a connection to a documentation address (192.0.2.1, never routed) and a name lookup are
    refused before anything leaves the machine and recorded; a real loopback server and client still talk."""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.9.1")
    assert not is_loopback("192.0.2.1") and not is_loopback("example.org") and not is_loopback("0.0.0.0")
    with network_blocked() as guard:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("192.0.2.1", 443))
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("huggingface.co", 443)
        with pytest.raises(OSError):
            socket.create_connection(("example.org", 80), timeout=1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(ConnectionRefusedError):
            udp.sendto(b"x", ("192.0.2.1", 53))
        assert guard.attempts == ["connect ('192.0.2.1', 443)", "getaddrinfo 'huggingface.co'",
                                  "getaddrinfo 'example.org'", "sendto ('192.0.2.1', 53)"]  # fmt: skip
        guard.attempts.clear()
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            thread = threading.Thread(target=lambda: server.accept()[0].sendall(b"pong"))
            thread.start()
            with socket.create_connection(("localhost", port), timeout=5) as client:
                assert client.recv(4) == b"pong"
            thread.join(5)
        assert guard.attempts == []
    assert socket.socket.connect is not None and socket.getaddrinfo.__module__ == "socket"  # restored


def test_ask_tries_no_network(no_network, capsys):
    image = ROOT / "examples" / "cxr_nih_00000001_000.png"
    assert main(["ask", "--model", str(NANO_GEMMA), "--image", str(image), "--max-new-tokens", "8", "Any effusion?"]) == 0
    assert capsys.readouterr().out.strip()
    assert no_network.attempts == []
