"""Refuse, and record, every network use except loopback: for tests of "no network calls at run time".

    from tests.netguard import network_blocked

    with network_blocked() as guard:
        main(["ask", "--model", folder, "hi"])
    assert guard.attempts == []

or the `no_network` fixture of tests/conftest.py (it also fails the test at teardown if anything was tried).
A server test (`serve`) can use it as is: binding and connecting to 127.0.0.1 / ::1 / localhost and Unix
sockets are allowed, so a real server on a random loopback port and its real client keep working.

What is patched, for the current process only (a subprocess is not covered): `socket.socket.connect`,
`connect_ex`, `sendto` and `sendmsg` (UDP) with a non-loopback address, and `socket.getaddrinfo` for a host
name other than localhost (a DNS lookup is network traffic too). A refused call raises the OSError a machine
without network would give (ConnectionRefusedError / socket.gaierror), so code under test takes its offline
path; each attempt is recorded as "<call> <address>" in `guard.attempts`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host) -> bool:
    """True for loopback IPs (127.0.0.0/8, ::1) and the localhost names; False for any other name or address."""
    if host is None:  # getaddrinfo(None, port): the local wildcard / loopback
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%", 1)[0]
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NetGuard:
    def __init__(self):
        self.attempts: list[str] = []

    def refuse(self, call: str, address) -> None:
        self.attempts.append(f"{call} {address!r}")

    def check_address(self, sock: socket.socket, call: str, address) -> None:
        if sock.family == getattr(socket, "AF_UNIX", None):
            return
        host = address[0] if isinstance(address, tuple) else address
        if not is_loopback(host):
            self.refuse(call, address)
            raise ConnectionRefusedError(f"netguard: {call} to {address!r} refused (only loopback is allowed in tests)")


@contextlib.contextmanager
def network_blocked() -> Iterator[NetGuard]:
    """Within the block, non-loopback network calls fail and are recorded in the yielded guard's `attempts`."""
    guard = NetGuard()
    cls = socket.socket
    originals = {name: getattr(cls, name) for name in ("connect", "connect_ex", "sendto", "sendmsg")}
    original_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        guard.check_address(self, "connect", address)
        return originals["connect"](self, address)

    def connect_ex(self, address):
        guard.check_address(self, "connect_ex", address)
        return originals["connect_ex"](self, address)

    def sendto(self, data, *args):
        guard.check_address(self, "sendto", args[-1])
        return originals["sendto"](self, data, *args)

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if address is not None:
            guard.check_address(self, "sendmsg", address)
            return originals["sendmsg"](self, buffers, ancdata, flags, address)
        return originals["sendmsg"](self, buffers, ancdata, flags)

    def getaddrinfo(host, *args, **kwargs):
        if not is_loopback(host):
            guard.refuse("getaddrinfo", host)
            raise socket.gaierror(socket.EAI_NONAME, f"netguard: name lookup of {host!r} refused in tests")
        return original_getaddrinfo(host, *args, **kwargs)

    for name, fn in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto), ("sendmsg", sendmsg)):
        setattr(cls, name, fn)
    socket.getaddrinfo = getaddrinfo
    try:
        yield guard
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)
        socket.getaddrinfo = original_getaddrinfo
