"""What runs inside the img2dataset child process (and, under Ray, in img2dataset's Ray tasks).

Why img2dataset runs in a child process: it installs a SIGINT handler (only legal on the main
thread, which a stage run by a threaded runner may not be on), prints a lot (tqdm, per-shard
lines, tracebacks of bad samples) from itself and from the processes it spawns, and imports
torch/wandb/albumentations (whose import phones home unless NO_ALBUMENTATIONS_UPDATE is set). A
child with its stdout/stderr sent to a log file contains all of that, and a crash in it (or an
interrupted stage, which ends its whole process group) cannot take the caller down.

Four changes to img2dataset, installed when this module is imported:

* **Decoding** (``_Cv2SafeDecode``): img2dataset's resizer calls ``cv2.imdecode``; its module
  global ``cv2`` is replaced by a proxy whose ``imdecode`` is data_prep.image_decode (header
  checks before decoding, 16-bit scaled, EXIF orientation applied, alpha composited on the
  configured background, first frame); every other cv2 call (resize, encode) is OpenCV's.
* **Deadline** (``_download_image``): img2dataset's ``urlopen(timeout)`` bounds each socket read,
  so a server sending a byte every 2 s never times out; the body is read in chunks against an
  overall ``request_deadline``.
* **Address policy** (``_download_image``): the request goes through
  data_prep.download.guarded_http's opener instead of urllib's default one: no file/ftp/data
  handlers, and every redirect and every connection held to the address policy (the list itself
  was filtered before img2dataset started).
* **Settings travel with the downloader**: ``SafeDownloader`` (img2dataset's Downloader plus our
  settings) is what the distributors pickle, so a Ray task that unpickles it imports this module
  and gets the same patches and settings as the child.

In the child, two img2dataset helpers that would each start yet another interpreter (its logger
process, and its pool when processes_count is 1) are replaced by in-process equivalents.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
import urllib.request
from typing import Any

from data_prep.download.guarded_http import guarded_opener
from data_prep.download.verify import DEADLINE_MESSAGE
from data_prep.image_decode import ImageRejected, decode_bgr_array

# Process-wide settings, set by SafeDownloader before each shard (one process downloads one shard
# at a time in both distributors; the resizer runs on the shard's own thread, the fetches on its pool).
# allow_private_addresses starts False: a process that somehow fetches before its settings are set fails closed.
_SETTINGS: dict[str, Any] = {"decode": None, "request_deadline": None, "allow_private_addresses": False}


class _Cv2SafeDecode:
    """cv2 as img2dataset's resizer sees it: imdecode replaced, everything else OpenCV's."""

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def imdecode(self, buf: Any, flags: int) -> Any:
        kw = _SETTINGS["decode"]
        if kw is None:
            return self._real.imdecode(buf, flags)
        try:
            return decode_bgr_array(bytes(buf), **kw)
        except ImageRejected as e:
            # The resizer turns any exception into the row's error string (status_dict, parquet):
            # keep only the reason phrase there, so per-shard counters do not grow one key per image.
            raise ValueError(str(e).split(":", 1)[0]) from None


def _download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's download_image with an overall deadline on connect + body, fetched through
    the address policy's opener."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    deadline_s = _SETTINGS["request_deadline"]
    deadline = time.monotonic() + deadline_s if deadline_s else None
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with guarded_opener(bool(_SETTINGS["allow_private_addresses"])).open(request, timeout=timeout) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            sock = getattr(getattr(getattr(r, "fp", None), "raw", None), "_sock", None)
            buf = io.BytesIO()
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return key, None, f"{DEADLINE_MESSAGE} ({deadline_s:g} s)"
                    if sock is not None:  # the last read may not outlast the deadline by a whole timeout
                        sock.settimeout(max(0.05, min(float(timeout), left)))
                chunk = r.read1(1 << 16)  # returns what has arrived (one recv), not a full 64 KiB
                if not chunk:
                    break
                buf.write(chunk)
        buf.seek(0)
        return key, buf, None
    except Exception as err:  # img2dataset's contract: the error string is the row's status
        return key, None, str(err)


def _install() -> None:
    import img2dataset  # noqa: F401  (its __init__ rebinds the name ``img2dataset.main``)

    resizer = sys.modules["img2dataset.resizer"]
    if not isinstance(resizer.cv2, _Cv2SafeDecode):
        resizer.cv2 = _Cv2SafeDecode(resizer.cv2)
    sys.modules["img2dataset.downloader"].download_image = _download_image


_install()

from img2dataset.downloader import Downloader  # noqa: E402  (after _install: same module either way)

from data_prep.download.sorted_writer import SortedWebDatasetSampleWriter  # noqa: E402  (img2dataset loaded above)


class SafeDownloader(Downloader):
    """img2dataset's Downloader carrying this stage's decode settings and deadline to wherever
    the distributor runs it (pickled by reference to this module)."""

    def __init__(self, *args, t2i_decode: dict[str, Any], t2i_request_deadline: float | None,
                 t2i_allow_private_addresses: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.t2i_decode = t2i_decode
        self.t2i_request_deadline = t2i_request_deadline
        self.t2i_allow_private_addresses = t2i_allow_private_addresses

    def __call__(self, row):
        _SETTINGS["decode"] = self.t2i_decode
        _SETTINGS["request_deadline"] = self.t2i_request_deadline
        _SETTINGS["allow_private_addresses"] = self.t2i_allow_private_addresses
        return super().__call__(row)


class _NoLogger:
    """Stands in for img2dataset's LoggerProcess, a spawned process (a second torch import,
    seconds of CPU) that only prints running totals and feeds wandb; the stage reads the per-shard
    stats files itself."""

    def __init__(self, *args, **kwargs):
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _inline_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):
    """img2dataset's multiprocessing distributor minus the pool, for processes_count == 1: this
    child is already the isolated process, and a one-worker pool would only cost another
    interpreter start. Same contract: downloader(row) -> (ok, row); failed shards retried."""
    failed = [row for row in reader if not downloader(row)[0]]
    for _ in range(max_shard_retry):
        if not failed:
            break
        failed = [row for ok, row in map(downloader, failed) if not ok]


def _downloader_factory(decode: dict[str, Any], request_deadline: float | None, allow_private_addresses: bool = False):
    def make(*args, **kwargs):
        return SafeDownloader(*args, t2i_decode=decode, t2i_request_deadline=request_deadline,
                              t2i_allow_private_addresses=allow_private_addresses, **kwargs)
    return make


def _trim_img2dataset(i2d, processes_count: int, decode: dict[str, Any], request_deadline: float | None,
                      allow_private_addresses: bool = False) -> None:
    # download() looks these names up in img2dataset.main's globals at call time. If a future
    # img2dataset renames them, nothing is patched and the stock (slower) behaviour remains.
    if hasattr(i2d, "LoggerProcess"):
        i2d.LoggerProcess = _NoLogger
    if processes_count == 1 and hasattr(i2d, "multiprocessing_distributor"):
        i2d.multiprocessing_distributor = _inline_distributor
    if not hasattr(i2d, "Downloader"):
        raise RuntimeError("img2dataset.main has no Downloader: this img2dataset version is not supported")
    if hasattr(i2d, "WebDatasetSampleWriter"):  # shards in key order, fixed tar headers: reproducible bytes
        i2d.WebDatasetSampleWriter = SortedWebDatasetSampleWriter
    i2d.Downloader = _downloader_factory(decode, request_deadline, allow_private_addresses)


def ray_runtime_env(runtime_env: dict | None) -> dict:
    """Ray's RAY_RUNTIME_ENV_HOOK, called by the ``ray.init()`` img2dataset's distributor triggers in
    the child: its tasks get the child's worker environment (no album/wandb phone-home, the
    checkout importable)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), **json.loads(os.environ.get("T2I_RAY_WORKER_ENV", "{}"))}
    return env


def child_main() -> None:
    """Entry point of the child process: ``python -c '...; child_main()' args.json``."""
    with open(sys.argv[1]) as f:
        args = json.load(f)
    # With the ray distributor, img2dataset connects to the runner's cluster itself (RAY_ADDRESS,
    # see ray_runtime_env) and submits one task per shard (parallelism is the cluster's).
    i2d = sys.modules["img2dataset.main"]
    decode = args["decode"]
    decode["background"] = tuple(decode["background"])
    _trim_img2dataset(i2d, args["kwargs"]["processes_count"], decode, args["request_deadline"],
                      bool(args.get("allow_private_addresses", False)))
    i2d.download(**args["kwargs"])
