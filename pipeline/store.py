"""Artifact store over fsspec: ``file://`` (default), ``s3://`` (s3fs), ``gs://`` (gcsfs).

Every stage reads and writes through URIs, so the same code runs on a laptop and on a cluster
whose workers share only object storage. Credentials and endpoints come only from the standard
environment (AWS_* variables, ~/.aws/config, ``AWS_ENDPOINT_URL``); nothing here logs them.

Writes that must never look complete when half-done go through :func:`write_bytes_atomic`:
on a local filesystem the bytes land in a temporary sibling and are renamed into place; on object
stores a single PUT is already all-or-nothing.
"""
from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec

SUPPORTED_SCHEMES = ("file", "s3", "gs")
T = TypeVar("T")


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def normalize(uri: str) -> str:
    """A bare path becomes an absolute ``file://`` URI; other URIs lose trailing slashes."""
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return "file://" + os.path.abspath(os.path.expanduser(rest))
    return f"{scheme}://{rest.rstrip('/')}"


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path that filesystem understands."""
    scheme = scheme_of(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported store URI scheme {scheme!r} in {uri!r}; allowed: {', '.join(SUPPORTED_SCHEMES)}")
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        fs = fsspec.filesystem("s3", **opts)
        return fs, uri.split("://", 1)[1]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying. botocore's connection errors (endpoint down, connection reset,
    timeouts) are not OSErrors and s3fs lets them through, so they are listed explicitly."""
    errs: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError  # optional: S3 support
        from botocore.exceptions import HTTPClientError

        errs += [BotoConnectionError, HTTPClientError]
    except ImportError:  # no S3 support installed: nothing more to catch
        pass
    return tuple(errs)


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run ``fn`` with bounded exponential backoff; object stores fail transiently. Once the
    attempts are spent: a StoreError naming what was done (with the URI) and the last cause."""
    last: BaseException | None = None
    for i in range(attempts):
        try:
            return fn()
        except _transient_errors() as e:  # FileNotFoundError is an OSError: not transient
            if isinstance(e, FileNotFoundError):
                raise
            last = e
            if i + 1 < attempts:
                time.sleep(base_delay * (2**i) * (1 + random.random() * 0.25))
    raise StoreError(f"{what} failed after {attempts} attempts: {last}") from last


class StoreError(RuntimeError):
    pass


def _fresh(fs, path: str) -> None:
    """Forget fsspec's cached listings of ``path`` (s3fs/gcsfs keep them per process): other
    processes (stage tasks, workers, another driver) write to the store, and a stale listing
    would hide a new manifest, attempt or checkpoint."""
    if scheme_of_fs(fs) != "file":
        fs.invalidate_cache(path)
        # ... and the listings cached below it: invalidate_cache forgets the path and its parents
        # only, so a glob (``checkpoints/step_*/COMPLETE``) would still see stale child folders.
        prefix = path.rstrip("/") + "/"
        cache = getattr(fs, "dircache", None)
        if cache is not None:
            for key in [k for k in list(cache) if k.startswith(prefix)]:
                cache.pop(key, None)


def scheme_of_fs(fs) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if protocol in ("file", "local") else protocol


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    _fresh(fs, path)
    return with_retries(lambda: fs.exists(path), what=f"exists({uri})")


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    return with_retries(lambda: fs.cat_file(path), what=f"read {uri}")


def _local_temp_copy(path: str, data: bytes) -> str:
    """``data`` written and synced to a temp file beside local ``path``; returns its path. A writer
    killed here leaves the file behind: its name matches no reader's pattern (``*.done.json``,
    ``*.tar``), so it never looks like a finished artifact."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = fs_and_path(uri)
    if scheme_of(uri) == "file":
        with_retries(lambda: os.replace(_local_temp_copy(path, data), path), what=f"write {uri}")
    else:
        with_retries(lambda: fs.pipe_file(path, data), what=f"write {uri}")


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``uri`` only if it does not exist, atomically against every other writer: True if
    this call created it, False if it existed. ``file://``: a hard link of a finished temp file
    (fails if the name exists; readers never see it half-written); ``s3://``: a conditional PUT
    (``If-None-Match: *``; AWS S3 since 2024, MinIO, moto); ``gs://``: fsspec's ``mode="create"``,
    which gcsfs sends as ``ifGenerationMatch=0``."""
    fs, path = fs_and_path(uri)
    if scheme_of(uri) == "file":
        tmp = _local_temp_copy(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    for attempt in range(3):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # s3fs reports the failed precondition (HTTP 412) as an OSError. After a retry it may be
            # our own earlier PUT whose answer was lost: then the object holds exactly our bytes.
            if "PreconditionFailed" in str(e) or "412" in str(e):
                _fresh(fs, path)
                return attempt > 0 and fs.cat_file(path) == data
            if attempt == 2:
                raise StoreError(f"create {uri} failed after 3 attempts: {e}") from e
            time.sleep(0.2 * 2 ** attempt)
    return False


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def listdir(uri: str) -> list[str]:
    """Full URIs of the direct children of ``uri`` (empty if it does not exist)."""
    fs, path = fs_and_path(uri)
    _fresh(fs, path)
    if not with_retries(lambda: fs.exists(path), what=f"exists({uri})"):
        return []
    scheme = scheme_of(uri)
    names = with_retries(lambda: fs.ls(path, detail=False), what=f"list {uri}")
    prefix = "file://" if scheme == "file" else f"{scheme}://"
    return sorted(prefix + n.rstrip("/") for n in names if n.rstrip("/") != path.rstrip("/"))


def glob(uri_pattern: str) -> list[str]:
    fs, path = fs_and_path(uri_pattern)
    _fresh(fs, path.split("*", 1)[0].rsplit("/", 1)[0])
    scheme = scheme_of(uri_pattern)
    prefix = "file://" if scheme == "file" else f"{scheme}://"
    return sorted(prefix + p for p in with_retries(lambda: fs.glob(path), what=f"glob {uri_pattern}"))


def size(uri: str) -> int:
    fs, path = fs_and_path(uri)
    return int(with_retries(lambda: fs.size(path), what=f"size {uri}"))


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        with_retries(lambda: fs.rm(path, recursive=recursive), what=f"remove {uri}")


def open_uri(uri: str, mode: str = "rb"):
    """A file object; for writes prefer write_bytes_atomic unless streaming large data."""
    fs, path = fs_and_path(uri)
    if "w" in mode and scheme_of(uri) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def local_path(uri: str) -> str | None:
    """The local filesystem path for a ``file://`` URI, else None."""
    return fs_and_path(uri)[1] if scheme_of(uri) == "file" else None
