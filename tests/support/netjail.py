"""A network jail for tests of the address policy: connections only to loopback, no name lookups.

The address-policy tests put rows naming 169.254.169.254 and other refused addresses in front of
the download stage. If the policy ever broke, those rows must fail loudly, not reach a real
metadata service or send a DNS query. ``install()`` makes this process's sockets refuse to connect
anywhere but 127.0.0.0/8 and ::1, and ``getaddrinfo`` refuse any name but literal addresses and
``localhost``; ``jail_subprocesses(folder)`` writes a ``sitecustomize.py`` that does the same in
every Python process started with ``folder`` on its PYTHONPATH (the download stage's img2dataset
child inherits the environment).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

JAIL_MESSAGE = "test network jail"
_REPO = Path(__file__).resolve().parents[2]


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _check(sock: socket.socket, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(str(address[0])):
        raise OSError(f"{JAIL_MESSAGE}: refused a connection to {address!r}")


def install() -> None:
    """Jail this process (idempotent). Undo with monkeypatch, or not at all in a subprocess."""
    if getattr(socket.socket, "_t2i_jailed", False):
        return
    real_getaddrinfo = socket.getaddrinfo

    class JailedSocket(socket.socket):
        _t2i_jailed = True

        def connect(self, address):
            _check(self, address)
            return super().connect(address)

        def connect_ex(self, address):
            _check(self, address)
            return super().connect_ex(address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost"):
            name = host.decode() if isinstance(host, bytes) else str(host)
            try:
                ipaddress.ip_address(name.split("%", 1)[0])
            except ValueError:
                raise socket.gaierror(socket.EAI_NONAME, f"{JAIL_MESSAGE}: no lookup of {name!r}") from None
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket = JailedSocket  # socket.create_connection and http.client build theirs from this name
    socket.getaddrinfo = getaddrinfo


def jail_subprocesses(folder: str | os.PathLike) -> str:
    """Write ``folder/sitecustomize.py`` installing the jail; returns ``folder`` (put it on PYTHONPATH)."""
    os.makedirs(folder, exist_ok=True)
    Path(folder, "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(_REPO)!r})\n"
        "from tests.support.netjail import install\n"
        "install()\n")
    return str(folder)
