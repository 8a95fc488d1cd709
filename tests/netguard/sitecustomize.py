"""Socket guard for offline proofs: any process started with this folder on PYTHONPATH
(Python imports `sitecustomize` at startup) may only talk to loopback. A connect or a DNS
lookup for anything else raises OSError AND is appended to $NETGUARD_LOG, so a library
that swallows the error is still caught: the tests assert that log stays empty.

Used by tests/conftest.py for every stage-script run, and by tests/test_offline.py."""

import os
import socket

_LOG = os.environ.get("NETGUARD_LOG")
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "", None}


def _is_loopback(host):
    if host in _LOCAL_NAMES:
        return True
    return isinstance(host, str) and (host.startswith("127.") or host == "::1")


def _deny(what):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    raise OSError(f"netguard: network access denied in an offline run: {what}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        _deny(f"connect {address[0]}:{address[1]}")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    h = host.decode() if isinstance(host, bytes) else host
    if not _is_loopback(h):
        _deny(f"resolve {h}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
