"""A TCP proxy on 127.0.0.1 that makes a local server look remote: each new connection waits
``latency_ms`` before it is connected and the bytes are forwarded at ``mbps`` megabytes per
second in each direction. ``t2i bench checkpoint`` puts it in front of moto's S3 server so that a
checkpoint upload takes as long, relative to a step, as it does to a real bucket."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

from pipeline.executors import free_port


class SlowProxy:
    def __init__(self, target_port: int, *, mbps: float, latency_ms: float = 0.0, target_host: str = "127.0.0.1",
                 listen_port: int = 0):
        if mbps <= 0:
            raise ValueError(f"mbps must be > 0 (got {mbps})")
        self.target = (target_host, target_port)
        self.bytes_per_s, self.latency_s = mbps * 1e6, latency_ms / 1e3
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="slow-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        time.sleep(self.latency_s)
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                chunk = src.recv(64 << 10)
                if not chunk:
                    break
                time.sleep(len(chunk) / self.bytes_per_s)  # the link's bandwidth
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


@contextmanager
def remote_like_s3(mbps: float, latency_ms: float):
    """A bucket on moto's S3 server, reached through a :class:`SlowProxy`; both run in child
    processes, so that neither competes with the measured process for its interpreter lock (a
    real store does not). Sets the AWS environment of this process for the duration; yields the
    bucket's URI."""
    import boto3
    import s3fs

    moto_port = free_port()
    children = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    proxy_port = free_port()
    children.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli.slow_proxy", str(moto_port), str(proxy_port),
                                      str(mbps), str(latency_ms)], stdout=subprocess.DEVNULL))
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    try:
        for port in (moto_port, proxy_port):
            _wait_for_port(port)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"t2i-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for child in children:
            child.terminate()
            child.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def _wait_for_port(port: int, limit_s: float = 30.0) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit_s:.0f} s")


if __name__ == "__main__":  # python -m pipeline.cli.slow_proxy TARGET_PORT LISTEN_PORT MBPS LATENCY_MS
    target, listen, rate, latency = sys.argv[1:5]
    proxy = SlowProxy(int(target), mbps=float(rate), latency_ms=float(latency), listen_port=int(listen))
    threading.Event().wait()
