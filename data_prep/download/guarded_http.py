"""The address policy held inside the fetch: a urllib opener for img2dataset's download threads.

The URL list is filtered before img2dataset runs (data_prep.download.url_list), but three things
happen only while fetching, and this opener holds each to the same rules
(data_prep.download.address_policy):

* **Redirects**: urllib follows them itself, to ``ftp://`` as well, and to any host. A redirect
  whose target the policy refuses fails the row (``rejected_address_policy``) before it is
  requested; the target's name is resolved here, on the worker.
* **The connection**: a name may resolve differently on the worker than it did when the list was
  checked (another resolver, a short TTL, DNS rebinding). Every connection resolves its host once,
  checks every address, and connects only to those checked addresses (not a second lookup).
* **Schemes**: the opener has no file, ftp or data handler; any other scheme fails the row.

Through a proxy (``http_proxy``/``https_proxy`` in the environment, honoured as urllib does) the
connection goes to the operator's proxy and the proxy resolves the target's name: there only the
list check and the redirect check apply.
"""
from __future__ import annotations

import functools
import http.client
import socket
import urllib.request
from typing import Any
from urllib.parse import urljoin, urlsplit

from data_prep.download.address_policy import (REFUSED_MESSAGE, address_reason, host_reason, scheme_reason,
                                               url_reason)


class AddressRefused(ValueError):
    """A fetch the address policy refused; its text (the row's error in img2dataset's parquet)
    starts with REFUSED_MESSAGE."""

    def __init__(self, reason: str, what: str):
        super().__init__(f"{REFUSED_MESSAGE} ({reason}): {what[:200]}")
        self.reason = reason


def connect_checked(address: tuple[str, int], timeout: Any, source_address: Any,
                    allow_private: bool) -> socket.socket:
    """socket.create_connection, refusing (before any packet is sent) a host that is, or resolves
    to, an address the policy refuses; connects to the addresses it checked."""
    host, port = address
    reason = host_reason(host, allow_private, resolve=None)  # literals and metadata names, no lookup
    if reason is not None:
        raise AddressRefused(reason, f"connection to {host}")
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        reason = address_reason(sockaddr[0], allow_private)
        if reason is not None:
            raise AddressRefused(reason, f"{host} resolves to {sockaddr[0]}")
    err: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:  # as socket.create_connection does
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # http.client's "no timeout given"
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            err = e
            if sock is not None:
                sock.close()
    raise err if err is not None else OSError(f"getaddrinfo returned no address for {host!r}")


class _CheckedConnection:
    """Mixed into http.client's connections: their one socket is opened by connect_checked."""

    def __init__(self, *args: Any, allow_private: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._t2i_allow_private = allow_private
        self._create_connection = self._checked_create_connection  # what http.client's connect() calls

    def _checked_create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        if self._tunnel_host:  # an HTTPS proxy (CONNECT): the socket goes to the operator's proxy
            return socket.create_connection(address, timeout, source_address)
        return connect_checked(address, timeout, source_address, self._t2i_allow_private)


class CheckedHTTPConnection(_CheckedConnection, http.client.HTTPConnection):
    pass


class CheckedHTTPSConnection(_CheckedConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req):
        if req.has_proxy():  # a plain-HTTP proxy: the connection is to the proxy, not the target
            return self.do_open(http.client.HTTPConnection, req)
        return self.do_open(functools.partial(CheckedHTTPConnection, allow_private=self.allow_private), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def https_open(self, req):
        kwargs: dict[str, Any] = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:  # as Python 3.11's https_open passes it on
            kwargs["check_hostname"] = self._check_hostname
        cls = functools.partial(CheckedHTTPSConnection, allow_private=self.allow_private)
        return self.do_open(cls, req, **kwargs)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_error_302(self, req, fp, code, msg, headers):
        # urllib itself refuses a redirect to file:// but follows one to ftp://; refuse every
        # scheme the policy does, under the policy's name.
        location = headers.get("location") or headers.get("uri")
        if location:
            reason = scheme_reason(urlsplit(urljoin(req.full_url, location)).scheme)
            if reason is not None:
                fp.close()
                raise AddressRefused(reason, f"redirect to {location}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        reason = url_reason(newurl, self.allow_private)  # the target's name resolved here, on the worker
        if reason is not None:
            raise AddressRefused(reason, f"redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RefuseOtherSchemes(urllib.request.UnknownHandler):
    def unknown_open(self, req):
        raise AddressRefused(scheme_reason(req.type) or "invalid_url", req.full_url)


@functools.lru_cache(maxsize=2)
def guarded_opener(allow_private: bool) -> urllib.request.OpenerDirector:
    """urllib's default opener (proxies from the environment, HTTP errors raised, redirects
    followed) less its file/ftp/data handlers, with the policy on redirects and connections.
    Shared by a process's download threads, as urllib's own global opener is."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _RefuseOtherSchemes(), _HTTPHandler(allow_private),
                    _HTTPSHandler(allow_private), urllib.request.HTTPDefaultErrorHandler(),
                    _RedirectHandler(allow_private), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener
