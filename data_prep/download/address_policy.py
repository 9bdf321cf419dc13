"""Which URLs the download stage may fetch: the address policy, as pure functions.

A URL list is untrusted input. urllib's default opener (what img2dataset fetches with) reads a
row ``file:///etc/passwd`` from the worker's disk into the shards, serves ``ftp://`` and
``data:`` rows, and a row naming ``169.254.169.254`` asks the cloud metadata service for the
worker's credentials. So every row is held to these rules before anything is requested:

* scheme: ``http`` and ``https`` only; any other is refused as ``scheme_<name>`` (a name outside
  :data:`KNOWN_SCHEMES` as ``scheme_other``, so a list of junk cannot grow the manifest's keys);
  a row urllib could not request at all (no scheme, no host, a bad port) as ``invalid_url``;
* host: the exact string http.client hands to ``getaddrinfo`` (percent-decoded, port and IPv6
  brackets removed), a literal address or every address a name resolves to:
  cloud metadata services (:data:`METADATA_ADDRESSES`, :data:`METADATA_HOSTS`) are ``metadata``
  and link-local addresses (169.254.0.0/16, fe80::/10) ``link_local``, refused always; loopback
  (``loopback``), ``0.0.0.0/8``, unspecified, multicast and reserved ranges (``reserved``) and the
  private ranges (10/8, 172.16/12, 192.168/16, 100.64/10 CGNAT, fc00::/7 ..., ``private``) are
  refused unless ``allow_private_addresses`` (the demo corpus is served on 127.0.0.1).

A name that does not resolve is not refused: the fetch fails on its own (a connection error,
retried like any other) and, if the name resolves by then, the connection is checked again
(data_prep.download.guarded_http). Resolution is injected (``resolve``) so tests never look up
a real name.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

Resolver = Callable[[str], Iterable[str]]  # host -> the addresses it resolves to; OSError when it does not
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
# Schemes counted under their own name (refused_scheme_<name>); any other is scheme_other.
KNOWN_SCHEMES = ("file", "ftp", "ftps", "sftp", "data", "gopher", "javascript", "mailto", "ws", "wss", "s3", "gs",
                 "blob", "jar", "ldap", "dict", "telnet", "tftp", "smb", "ssh")
# Every non-scheme reason, so the manifest always has the same refused_<reason> keys.
REASONS = ("invalid_url", "metadata", "link_local", "loopback", "private", "reserved")
PRIVATE_REASONS = ("loopback", "private", "reserved")  # the ones allow_private_addresses lifts
# What a row refused inside the fetch (a redirect, a name that now resolves elsewhere) fails with;
# data_prep.download.verify counts it as rejected_address_policy.
REFUSED_MESSAGE = "refused by the address policy"

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack instance metadata
    "fd00:ec2::254",    # AWS instance metadata over IPv6
    "169.254.170.2",    # AWS ECS task credentials
    "169.254.170.23", "fd00:ec2::23",  # AWS EKS pod identity agent
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",      # Oracle Cloud Classic
    "168.63.129.16",    # Azure WireServer (a public address, so only this list catches it)
))
# Names of metadata services, refused before any lookup (they resolve only inside the cloud).
METADATA_HOSTS = frozenset(("metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.tencentyun.com"))

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # embeds the IPv4 address it translates to
_EXTRA_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "100.64.0.0/10",    # carrier-grade NAT: not is_private in Python, not reachable from the internet either
    "64:ff9b:1::/48",   # local-use NAT64
))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.x to this host
# The legacy IPv4 spellings getaddrinfo accepts without a lookup (127.1, 0x7f000001, 2130706433, 0177.0.0.1).
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")


def scheme_reason(scheme: str | None) -> str | None:
    """None for http/https; ``scheme_<name>`` (or ``scheme_other``) for any other; ``invalid_url`` for none."""
    if not scheme:
        return "invalid_url"
    scheme = scheme.lower()
    if scheme in ALLOWED_SCHEMES:
        return None
    return f"scheme_{scheme}" if scheme in KNOWN_SCHEMES else "scheme_other"


def address_reason(addr: str | IPAddress, allow_private: bool = False) -> str | None:
    """Why a connection to this address is refused, or None. Unparsable input is refused
    (``reserved``): a resolver that answers something other than an address is not trusted."""
    try:
        ip = addr if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(addr)
    except ValueError:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that IPv4 host: judge that one.
        if ip.ipv4_mapped is not None:
            return address_reason(ip.ipv4_mapped, allow_private)
        if ip in _NAT64:
            return address_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), allow_private)
        if ip.sixtofour is not None:
            inner = address_reason(ip.sixtofour, allow_private)
            if inner is not None:
                return inner
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])  # the zone (fe80::1%eth0) does not matter
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if ip.is_link_local:
        return "link_local"
    reason = _private_reason(ip)
    return None if reason is None or allow_private else reason


def _private_reason(ip: IPAddress) -> str | None:
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip in _THIS_NETWORK:
        return "reserved"
    if (ip.is_private or not ip.is_global or any(ip in n for n in _EXTRA_PRIVATE)
            or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)):
        return "private"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a host string spells, as getaddrinfo would read it without a lookup; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def system_resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to, as http.client's connection would see them."""
    return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def host_reason(host: str, allow_private: bool = False, resolve: Resolver | None = system_resolve) -> str | None:
    """Why connecting to ``host`` (a name or a literal address) is refused, or None. A name is
    refused if any address it resolves to is (the connection may pick any of them); one that does
    not resolve is not refused here. ``resolve=None``: names are judged by name only."""
    if not host:
        return "invalid_url"
    literal = literal_address(host)
    if literal is not None:
        return address_reason(literal, allow_private)
    if host.lower().rstrip(".") in METADATA_HOSTS:
        return "metadata"
    if resolve is None:
        return None
    try:
        addresses = list(resolve(host))
    except (OSError, UnicodeError):  # gaierror; an IDNA name that cannot be encoded
        return None
    reasons = [address_reason(a, allow_private) for a in addresses]
    return next((r for r in reasons if r is not None), None)


def url_target(url: str) -> tuple[str, str]:
    """(scheme, host) of ``url`` exactly as urllib would request it: the scheme lower-cased, the
    host as http.client hands it to getaddrinfo ('' for a scheme other than http/https). Parsed by
    urllib and http.client themselves, so the policy judges the host that would be contacted (no
    second parser to disagree with them on ``http://a@b``, ``%2e``, ``<URL:...>``). ValueError when
    urllib could not request it."""
    req = urllib.request.Request(url)  # ValueError: unknown url type (no scheme)
    if req.type not in ALLOWED_SCHEMES:
        return req.type, ""
    if not req.host:
        raise ValueError(f"no host in {url[:80]!r}")
    try:
        return req.type, http.client.HTTPConnection(req.host).host  # no socket yet: only host/port parsing
    except http.client.InvalidURL as e:  # a non-numeric port, a control character
        raise ValueError(str(e)) from None


def url_reason(url: str, allow_private: bool = False, resolve: Resolver | None = system_resolve) -> str | None:
    """Why the policy refuses ``url``, or None (see the module's docstring)."""
    try:
        scheme, host = url_target(url)
    except ValueError:
        return "invalid_url"
    return scheme_reason(scheme) or host_reason(host, allow_private, resolve)


class HostChecker:
    """host_reason() of many hosts: each distinct host looked up once (cached across the files of a
    list), the lookups of one batch run side by side (a LAION part file has ~1M rows but far fewer
    hosts; most of a lookup is waiting on the resolver)."""

    MAX_CACHED = 1_000_000  # bounds the memory of a very long list; cleared, not evicted one by one

    def __init__(self, allow_private: bool, resolve: Resolver | None = system_resolve, threads: int = 32):
        self.allow_private, self.resolve, self.threads = allow_private, resolve, threads
        self._cache: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def reasons(self, hosts: Iterable[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        todo: list[str] = []
        with self._lock:
            for h in dict.fromkeys(hosts):
                if h in self._cache:
                    out[h] = self._cache[h]
                else:
                    todo.append(h)
        if todo:
            def judge(h: str) -> str | None:
                return host_reason(h, self.allow_private, self.resolve)

            if len(todo) == 1:
                found = [judge(todo[0])]
            else:
                with ThreadPoolExecutor(max_workers=min(self.threads, len(todo))) as pool:
                    found = list(pool.map(judge, todo))
            with self._lock:
                if len(self._cache) + len(todo) > self.MAX_CACHED:
                    self._cache.clear()
                self._cache.update(zip(todo, found))
            out.update(zip(todo, found))
        return out
