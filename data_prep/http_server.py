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
import time
from dataclasses import dataclass, field


@dataclass
class Route:
    """A canned response for one path (tests of what real servers do): extra headers such as
    ``X-Robots-Tag: noai``, a body trickled one byte every ``trickle_s`` seconds, a 503 for
    the first ``fail_first`` requests, or another ``status`` (a 302 with a ``Location`` header)."""

    body: bytes
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    trickle_s: float | None = None
    fail_first: int = 0  # answer this many requests with 503 first (a flaky or rate-limiting server)
    status: int = 200
    _served: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take_failure(self) -> bool:
        with self._lock:
            self._served += 1
            return self._served <= self.fail_first


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    routes: dict[str, Route] = {}
    requests: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # one line per request on stderr would drown the stage's output

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:  # every request that reached the server, whatever its method or answer
            self.requests.append(f"{self.command} {self.path}")
        return ok

    def do_GET(self):  # noqa: N802 - the stdlib's name
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            return super().do_GET()
        if route.take_failure():
            self.send_error(503, "Service Unavailable")
            return
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        for k, v in route.headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            if route.trickle_s is None:
                self.wfile.write(route.body)
                return
            for i in range(len(route.body)):
                self.wfile.write(route.body[i:i + 1])
                self.wfile.flush()
                time.sleep(route.trickle_s)  # the slow server under test, not a wait for a result
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its deadline): what a trickle route is for


class DemoHTTPServer:
    """``with DemoHTTPServer(root) as srv: srv.url("images/000000.jpg")``.

    Missing files answer 404; the content type follows the file extension (so an HTML page named
    ``.jpg`` is served as ``image/jpeg``, as misconfigured real servers do). ``routes`` maps a
    path (``"/slow.jpg"``) to a canned :class:`Route`. ``requests`` records every request the
    server got (``"GET /a.jpg"``), in arrival order.
    """

    def __init__(self, root: str, host: str = "127.0.0.1", routes: dict[str, Route] | None = None, port: int = 0):
        if host != "127.0.0.1":  # ThreadingHTTPServer is IPv4; loopback only by design
            raise ValueError(f"DemoHTTPServer binds 127.0.0.1 only; got host={host!r}")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.host, self.wanted_port = host, port  # 0: any free port
        self.routes: dict[str, Route] = dict(routes or {})  # "/path" -> Route; add before or while running
        self.requests: list[str] = []
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
        # This server's own routes and request log (a class attribute would be shared by every server).
        cls = type("_Handler", (_QuietHandler,), {"routes": self.routes, "requests": self.requests})
        handler = functools.partial(cls, directory=self.root)
        httpd = http.server.ThreadingHTTPServer((self.host, self.wanted_port), handler)  # 0: the OS picks
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
