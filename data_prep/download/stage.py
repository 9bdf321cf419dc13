"""Download stage: a URL+caption list -> webdataset shards, with img2dataset.

``run(cfg, ctx)`` writes ``<ctx.out_uri>/shards/NNNNN.tar`` (+ img2dataset's ``NNNNN_stats.json``
and ``NNNNN.parquet``) and ``<ctx.out_uri>/img2dataset.log``. Broken URLs, non-images, corrupt,
oversized and degenerate images are counted by reason (``rejected_<reason>``), never fatal; a
success rate under ``min_success_rate``, a stage that would finish with no samples, or a tar
holding fewer samples than img2dataset counted stops the stage with a message naming the cause.

The pieces: data_prep/download/config.py (the config and its validation), data_prep/download/url_list.py
(reading, decoding and filtering the list into normalised parquet files), data_prep/download/child.py
(what runs in img2dataset's process: safe, faithful decoding and a per-request deadline),
data_prep/download/verify.py (counts by reason, tars checked against the stats).

Distributors: ``multiprocessing`` by default; img2dataset's ``ray`` distributor when the runner
says Ray is up (``ctx.ray_enabled``) and the list is not the demo (which lives on this machine's
loopback). The ray distributor submits one task per shard, ignores processes_count and does not
retry failed shards; both distributors' failed shards surface the same way here: a shard without
its ``_stats.json`` is removed and its rows are counted in ``rows_in_failed_shards``. With Ray on
several machines the output must be an object store (s3://, gs://): each task writes its shard
where it runs.

``url_list: demo`` generates the synthetic corpus (data_prep.demo_corpus) in a temporary folder
and serves it on 127.0.0.1 for the duration of the stage.

Address policy (data_prep/download/address_policy.py): rows the policy refuses (schemes other
than http/https, metadata services, link-local, and private/loopback addresses unless
``allow_private_addresses``) are removed from the list before img2dataset runs and counted as
``refused_<reason>``; redirects and connections are held to it inside the fetch
(data_prep/download/guarded_http.py), counted as ``rejected_address_policy``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

from data_prep.demo_corpus import serve_demo_corpus
from data_prep.download.address_policy import PRIVATE_REASONS
from data_prep.download.config import DEMO, DownloadConfig, local_path
from data_prep.download.retry import build_retry_list, fetch_list, load_state, next_first_id, save_list, save_pass
from data_prep.download.verify import SHARD_DIGITS, Pass, summarize
from data_prep.download.url_list import UrlListError, prepare_url_list
from pipeline import layout, store
from pipeline.context import StageContext, StageFailed, StageResult

__all__ = ["DEMO", "DownloadConfig", "resume_failed", "run"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The child's first lines. torch is imported only by webdataset's optional PyTorch integration
# (it falls back to stand-ins without it) and wandb only by img2dataset's logger process, which the
# child replaces: keeping both out cuts the child's start from ~7 s to ~2.6 s on 2 cores.
_CHILD_BOOT = ("import sys, types; sys.modules.setdefault('torch', None); "
               "sys.modules.setdefault('wandb', types.ModuleType('wandb')); "
               "from data_prep.download.child import child_main; child_main()")
_POLL_S = 2.0  # how often the shards folder is listed (listing an object store is not free)
# A shard that has not finished this long after the previous one did is named in the progress.
_STUCK_AFTER_S = 30.0


@contextlib.contextmanager
def _resolved_url_list(cfg: DownloadConfig, ctx: StageContext) -> Iterator[str]:
    if cfg.url_list != DEMO:
        yield cfg.url_list
        return
    d = cfg.demo
    tmp = tempfile.mkdtemp(prefix="t2i-demo-corpus-")
    try:
        ctx.progress(f"download: generating demo corpus ({d.num_images} images, seed {d.seed})")
        with serve_demo_corpus(tmp, d.num_images, d.image_size, d.seed, d.bad_fraction) as info:
            ctx.progress(f"download: demo corpus ({info.num_good} good, {info.num_bad} broken rows) served on 127.0.0.1")
            yield info.parquet_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ray_address(cfg: DownloadConfig, ctx: StageContext) -> str | None:
    """The Ray cluster's GCS address when the stage should use img2dataset's ray distributor: the
    runner's executor says whether the stage runs on Ray and where (no Ray import here).

    The demo corpus is served on this machine's loopback, which other nodes of a cluster cannot
    reach, so the demo always downloads with local processes.
    """
    executor = ctx.executor
    if cfg.url_list == DEMO or getattr(executor, "kind", "local") != "ray":
        return None
    return executor.ray_address()


def _child_env(cfg: DownloadConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations checks PyPI at import otherwise
    env["WANDB_MODE"] = "disabled"
    env["WANDB_SILENT"] = "true"
    env["TQDM_DISABLE"] = "1"
    # OpenCV reads its own pixel limit at import; nothing should reach cv2.imdecode past ours, but
    # if anything does (a future img2dataset path), OpenCV refuses it too.
    env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_image_pixels or 2 ** 30)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _img2dataset_kwargs(cfg: DownloadConfig, list_folder: str, shards_uri: str, distributor: str) -> dict[str, Any]:
    out = shards_uri if store.scheme_of(shards_uri) != "file" else store.local_path(shards_uri)
    return dict(
        url_list=list_folder,
        output_folder=out,
        input_format="parquet",  # data_prep.download.url_list wrote every list, whatever its format, as parquet
        url_col="url",
        caption_col="caption",
        save_additional_columns=list(cfg.save_additional_columns) or None,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
        max_image_area=float(cfg.max_image_pixels) if cfg.max_image_pixels is not None else float("inf"),
        number_sample_per_shard=cfg.number_sample_per_shard,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
        disallowed_header_directives=list(cfg.disallowed_header_directives),
        output_format="webdataset",
        encode_format="jpg",
        oom_shard_count=SHARD_DIGITS,
        distributor=distributor,
        enable_wandb=False,
        # Not 'overwrite': img2dataset creates <output>/_tmp first and then, in overwrite mode,
        # deletes the whole output folder, _tmp included, and fails writing its URL-list shards
        # there. run() empties the folder itself, so 'incremental' finds no done shards.
        incremental_mode="incremental",
        max_shard_retry=1,
    )


def _decode_settings(cfg: DownloadConfig) -> dict[str, Any]:
    """Keyword arguments of data_prep.image_decode.decode_bgr_array in the child."""
    return {"max_pixels": cfg.max_image_pixels, "min_side": cfg.min_image_size,
            "max_aspect_ratio": cfg.max_aspect_ratio, "background": list(cfg.alpha_background)}


def _run_child(cfg: DownloadConfig, kwargs: dict[str, Any], ray_address: str | None, shards_uri: str,
               ids: list[str], log_path: str, ctx: StageContext) -> int:
    env = _child_env(cfg)
    args_path = log_path + ".args.json"
    worker_env = {k: env[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE", "WANDB_SILENT", "TQDM_DISABLE",
                                      "OPENCV_IO_MAX_IMAGE_PIXELS")}
    # Ray tasks unpickle data_prep.download.child.SafeDownloader: this checkout must be importable there.
    worker_env["PYTHONPATH"] = _REPO_ROOT + os.pathsep + "${PYTHONPATH}"
    if ray_address:
        # img2dataset's ray distributor starts Ray itself on its first task (ray.init() reads
        # RAY_ADDRESS); Ray's runtime-env hook gives its tasks the environment above.
        env["RAY_ADDRESS"] = ray_address
        env["RAY_RUNTIME_ENV_HOOK"] = "data_prep.download.child.ray_runtime_env"
        env["T2I_RAY_WORKER_ENV"] = json.dumps(worker_env)
    with open(args_path, "w") as f:
        json.dump({"kwargs": kwargs, "decode": _decode_settings(cfg), "request_deadline": cfg.request_deadline,
                   "allow_private_addresses": cfg.allow_private_addresses}, f)
    cmd = [sys.executable, "-c", _CHILD_BOOT, args_path]
    with open(log_path, "wb") as log:
        # A session of its own, so the pool and logger processes img2dataset spawns can be ended
        # together (by this child's process-group id) if the stage is interrupted.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=_REPO_ROOT, start_new_session=True)
        try:
            return _wait_with_progress(proc, shards_uri, ids, ctx)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                proc.wait()


def _wait_with_progress(proc: subprocess.Popen, shards_uri: str, ids: list[str], ctx: StageContext) -> int:
    """Wait for the child, reporting shards as they finish and naming the ones that stall."""
    done_before, last_check = -1, time.monotonic()
    last_change, last_stuck_note = time.monotonic(), time.monotonic()
    while True:
        try:
            rc = proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            rc = None
        now = time.monotonic()
        if rc is None and now - last_check < _POLL_S:
            continue
        last_check = now
        done_ids = {os.path.basename(u)[:SHARD_DIGITS] for u in store.glob(store.join(shards_uri, "*" + layout.SHARD_STATS))}
        done_ids &= set(ids)  # this pass's shards only
        if len(done_ids) != done_before:
            ctx.progress(f"download: {len(done_ids)}/{len(ids)} shards done")
            report = getattr(ctx, "report", None)  # the driver's live line (pipeline/progress.py)
            if report is not None:
                report(done=len(done_ids), total=len(ids), unit="shards")
            done_before, last_change = len(done_ids), now
        if rc is not None:  # a fast pass still ends with its count on the console
            return rc
        elif now - last_change > _STUCK_AFTER_S and now - last_stuck_note > _STUCK_AFTER_S:
            pending = [i for i in ids if i not in done_ids]
            shown = ", ".join(pending[:8]) + (f" (+{len(pending) - 8} more)" if len(pending) > 8 else "")
            ctx.progress(f"download: no shard finished for {now - last_change:.0f} s; still running or queued: {shown}")
            last_stuck_note = now


def _tail(path: str, n: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", errors="replace")


def _img2dataset_pass(cfg: DownloadConfig, kwargs: dict[str, Any], ray_address: str | None, shards_uri: str,
                      this: Pass, tmp: str, n: int, ctx: StageContext) -> str:
    """One img2dataset run; its log is appended to ``<out>/img2dataset.log``. Returns the log's end."""
    log_path = os.path.join(tmp, f"img2dataset.{n}.log")
    try:
        rc = _run_child(cfg, kwargs, ray_address, shards_uri, this.ids(), log_path, ctx)
    finally:
        with contextlib.suppress(Exception):
            uri = store.join(ctx.out_uri, "img2dataset.log")
            before = store.read_bytes(uri) if n > 0 and store.exists(uri) else b""
            with open(log_path, "rb") as f:
                store.write_bytes_atomic(uri, before + f.read())
    log_tail = _tail(log_path, 20000)
    if rc != 0:
        raise StageFailed(f"download: img2dataset exited with status {rc}; end of its log:\n{log_tail[-4000:]}")
    return log_tail


def run(cfg: DownloadConfig, ctx: StageContext) -> StageResult:
    # An earlier run of this very attempt (same config) stopped: on min_success_rate, a killed
    # driver, a crash. Its finished shards are kept and only what failed is fetched again.
    if load_state(ctx.out_uri) is not None:
        ctx.progress("download: continuing this attempt: keeping its finished shards, fetching only failed rows")
        return resume_failed(cfg, ctx)
    shards_uri = store.join(ctx.out_uri, layout.SHARDS)
    with tempfile.TemporaryDirectory(prefix="t2i-download-") as tmp, _resolved_url_list(cfg, ctx) as url_list:
        input_format = cfg.input_format or "parquet"  # demo corpus is parquet; otherwise set by validation
        try:
            prepared = prepare_url_list(cfg, local_path(url_list) or url_list, input_format,
                                        os.path.join(tmp, "list"))
        except UrlListError as e:
            raise StageFailed(f"download: {e}") from e
        rows_per_shard = prepared.rows_per_shard
        num_rows = sum(rows_per_shard)
        lc = prepared.counts
        if num_rows == 0:
            dropped = ", ".join(f"{k} {v}" for k, v in lc.items() if v and k != "rows_in_list")
            private = sum(lc.get(f"refused_{r}", 0) for r in PRIVATE_REASONS)
            hint = ("; set download.allow_private_addresses: true if the list is served inside your own network"
                    if private and not cfg.allow_private_addresses else "")
            raise StageFailed(f"download: url_list {cfg.url_list!r} has no rows to download ({lc['rows_in_list']} "
                              f"rows in the list{'; dropped: ' + dropped if dropped else ''}){hint}")
        # No state: whatever shards are here are leftovers of a start that never saved its list
        # (nothing to continue from); they must never be mistaken for done shards.
        store.remove(shards_uri)
        filtered = sum(v for k, v in lc.items() if k.startswith("filtered_"))
        refused = ", ".join(f"{k[len('refused_'):]} {v}" for k, v in lc.items() if k.startswith("refused_") and v)
        ctx.progress(f"download: {num_rows} rows ({filtered} filtered out of {lc['rows_in_list']}"
                     f"{'; refused by the address policy: ' + refused if refused else ''}) -> "
                     f"{len(rows_per_shard)} shards with img2dataset ({_distributor(cfg, ctx)[1]})")
        state = save_list(ctx.out_uri, prepared.folder, lc, Pass(0, rows_per_shard))
        passes, elapsed = _passes(cfg, ctx, state, prepared.folder, tmp, cfg.retry_failed, first_pass=True)
    return _finish(cfg, ctx, state, passes, elapsed)


def resume_failed(cfg: DownloadConfig, ctx: StageContext, passes: int | None = None) -> StageResult:
    """Finish a download whose earlier attempt (into this ``ctx.out_uri``) stopped, typically on
    ``min_success_rate``: its finished shards are kept, and only the rows that failed transiently
    or whose shard did not finish are fetched, into new shards (``passes`` more passes, default
    ``max(1, retry_failed)``). The counts cover every pass. ``t2i resume`` calls this instead of
    clearing the stage when the attempt left its state (``<out>/url_list/state.json``)."""
    state = load_state(ctx.out_uri)
    if state is None:
        raise StageFailed(f"download: nothing to resume under {ctx.out_uri} (no url_list/state.json); run it afresh")
    with tempfile.TemporaryDirectory(prefix="t2i-download-") as tmp:
        folder = fetch_list(ctx.out_uri, len(state["passes"]) - 1, os.path.join(tmp, "list"))
        done, elapsed = _passes(cfg, ctx, state, folder, tmp, passes or max(1, cfg.retry_failed), first_pass=False)
    return _finish(cfg, ctx, state, done, elapsed)


def _distributor(cfg: DownloadConfig, ctx: StageContext) -> tuple[str | None, str]:
    ray_address = _ray_address(cfg, ctx)
    return ray_address, "ray" if ray_address else "multiprocessing"


def _passes(cfg: DownloadConfig, ctx: StageContext, state: dict[str, Any], list_folder: str, tmp: str,
            retries: int, first_pass: bool) -> tuple[list[Pass], float]:
    """The first img2dataset pass (unless resuming), then up to ``retries`` passes over what failed."""
    shards_uri = store.join(ctx.out_uri, layout.SHARDS)
    ray_address, distributor = _distributor(cfg, ctx)
    kwargs = _img2dataset_kwargs(cfg, list_folder, shards_uri, distributor)
    t0 = time.time()
    passes = [Pass(p["first_id"], p["rows_per_shard"]) for p in state["passes"]]
    log_tail = ""
    if first_pass:
        log_tail = _img2dataset_pass(cfg, kwargs, ray_address, shards_uri, passes[0], tmp, 0, ctx)
    for _ in range(retries):
        n = len(passes)
        retry_folder = os.path.join(tmp, f"retry{n}")
        rps = build_retry_list(shards_uri, passes[-1], list_folder, cfg.number_sample_per_shard,
                               list(cfg.save_additional_columns), retry_folder)
        if not rps:
            break
        first = next_first_id(shards_uri)
        ctx.progress(f"download: pass {n + 1}: fetching again the {sum(rps)} rows that failed transiently "
                     f"(timeouts, refused connections, HTTP 429/5xx, unfinished shards) into shards from "
                     f"{first:0{SHARD_DIGITS}d}")
        passes.append(Pass(first, rps))
        save_pass(ctx.out_uri, state, retry_folder, passes[-1])  # before it runs: a kill mid-pass can resume
        kw = dict(kwargs, url_list=retry_folder, incremental_mode="extend")
        log_tail = _img2dataset_pass(cfg, kw, ray_address, shards_uri, passes[-1], tmp, n, ctx)
        list_folder = retry_folder
    state["log_tail"] = log_tail
    return passes, time.time() - t0


def _finish(cfg: DownloadConfig, ctx: StageContext, state: dict[str, Any], passes: list[Pass],
            elapsed: float) -> StageResult:
    shards_uri = store.join(ctx.out_uri, layout.SHARDS)
    store.remove(store.join(shards_uri, "_tmp"))  # img2dataset's scratch copies of the URL list
    result = summarize(shards_uri, passes[0].rows_per_shard, cfg.min_success_rate, elapsed,
                       state.get("log_tail", ""), state["list_counts"], passes)
    c = result.counts
    reasons = ", ".join(f"{k[len('rejected_'):]} {v}" for k, v in c.items() if k.startswith("rejected_") and v)
    ctx.progress(f"download: {c['successes']}/{c['total']} rows became samples in {c['shards']} shards"
                 + (f"; rejected: {reasons}" if reasons else ""))
    return result


def _summarize(cfg: DownloadConfig, shards_uri: str, rows_per_shard: list[int], elapsed: float) -> StageResult:
    """summarize() with the thresholds of ``cfg`` (kept for callers of the earlier name)."""
    return summarize(shards_uri, rows_per_shard, cfg.min_success_rate, elapsed)
