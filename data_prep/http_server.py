"""A static file server on loopback for the demo corpus (and tests).

img2dataset fetches over HTTP; serving the generated corpus from 127.0.0.1 makes the demo and
the tests exercise the very same download path as a web-scale run, with no network. The server
binds 127.0.0.1 only (never 0.0.0.0: a demo must not expose files to the LAN) on an ephemeral
port, runs in a daemon thread, and is a context manager so it always stops.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # one line per request on stderr would drown the stage's output


class DemoHTTPServer:
    """``with DemoHTTPServer(root) as srv: srv.url("images/000000.jpg")``.

    Missing files answer 404; the content type follows the file extension (so an HTML page named
    ``.jpg`` is served as ``image/jpeg``, as misconfigured real servers do).
    """

    def __init__(self, root: str, host: str = "127.0.0.1"):
        if host != "127.0.0.1":  # ThreadingHTTPServer is IPv4; loopback only by design
            raise ValueError(f"DemoHTTPServer binds 127.0.0.1 only; got host={host!r}")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.host = host
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("DemoHTTPServer is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, relpath: str) -> str:
        return f"{self.base_url}/{relpath.lstrip('/')}"

    def start(self) -> "DemoHTTPServer":
        if self._httpd is not None:
            return self
        handler = functools.partial(_QuietHandler, directory=self.root)
        httpd = http.server.ThreadingHTTPServer((self.host, 0), handler)  # port 0: the OS picks a free one
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"demo-http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()  # returns once serve_forever has exited
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> "DemoHTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
