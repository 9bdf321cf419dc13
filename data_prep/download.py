"""Download stage: a URL+caption list -> webdataset shards, with img2dataset.

``run(cfg, ctx)`` writes ``<ctx.out_uri>/shards/NNNNN.tar`` (+ img2dataset's ``NNNNN_stats.json``
and ``NNNNN.parquet``) and ``<ctx.out_uri>/img2dataset.log``. Broken URLs, non-images and corrupt
files are counted, never fatal; a success rate under ``min_success_rate`` stops the stage with the
most common error strings and the worst shards in the message.

Why img2dataset runs in a child process: it installs a SIGINT handler (only legal on the main
thread, which a stage run by a threaded runner may not be on), prints a lot (tqdm, per-shard
lines, tracebacks of bad samples) from itself and from the processes it spawns, and imports
torch/wandb/albumentations (whose import phones home unless NO_ALBUMENTATIONS_UPDATE is set). A
child with its stdout/stderr sent to a log file contains all of that, and a crash in it (or an
interrupted stage, which ends its whole process group) cannot take the caller down. In that
child two img2dataset helpers that would each start yet another interpreter (its logger process,
and its pool when processes_count is 1) are replaced by in-process equivalents; see
``_trim_img2dataset``.

Distributors: ``multiprocessing`` by default; img2dataset's ``ray`` distributor when the runner
says Ray is up (``ctx.ray_enabled``) and the list is not the demo (which lives on this machine's
loopback). The ray distributor submits one task per shard, ignores processes_count and does not
retry failed shards; both distributors' failed shards surface the same way here: a shard without
its ``_stats.json`` is removed and its rows are counted in ``rows_in_failed_shards``. With Ray on
several machines the output must be an object store (s3://, gs://): each task writes its shard
where it runs.

``url_list: demo`` generates the synthetic corpus (data_prep.demo_corpus) in a temporary folder
and serves it on 127.0.0.1 for the duration of the stage.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, ClassVar, Iterator, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from data_prep.demo_corpus import DemoCorpusConfig, serve_demo_corpus
from data_prep.shards import list_shards, read_shard_stats, shard_id
from pipeline import store
from pipeline.configbase import StrictModel, TaskPlacement
from pipeline.context import StageContext, StageFailed, StageResult

DEMO = "demo"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are 00000.tar, 00001.tar, ...
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DownloadConfig(TaskPlacement):
    """The download stage: which URL list, how images are resized, how hard to try."""

    # How the work is scheduled, not what it produces: changing these must not re-run the stage.
    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("processes_count", "thread_count", "resources")

    url_list: str = Field(
        DEMO,
        description="Path or URI (file://, s3://, gs://) of a parquet or csv URL list, or a folder of them; "
        "or 'demo': generate the synthetic demo corpus and serve it on 127.0.0.1 while the stage runs.",
    )
    input_format: Literal["parquet", "csv"] | None = Field(
        None, validate_default=True,
        description="Format of url_list; inferred from its extension (or a folder's files) when omitted.",
    )
    url_col: str = Field("url", min_length=1, description="Column holding the image URL.")
    caption_col: str = Field("caption", min_length=1, description="Column holding the caption.")
    image_size: int = Field(256, gt=0, description="Side of the stored images (square unless resize_mode is keep_ratio/no).")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = Field(
        "center_crop",
        description="center_crop: shorter side to image_size then crop the centre; border: longer side to "
        "image_size then pad with white; keep_ratio: shorter side to image_size; no: keep as is.",
    )
    min_image_size: int = Field(0, ge=0, description="Drop images whose shorter side is below this (pixels).")
    max_aspect_ratio: float | None = Field(
        None, ge=1.0, description="Drop images whose long/short side ratio exceeds this; null = no limit."
    )
    number_sample_per_shard: int = Field(
        10000, gt=0,
        description="URL rows per output shard. Sample keys are 5 + ceil(log10(this)) digits "
        "(shard id, then index in the shard): 9 digits for 1001..10000.",
    )
    processes_count: int = Field(1, gt=0, description="Download processes (multiprocessing distributor).")
    thread_count: int = Field(16, gt=0, description="Download threads per process.")
    timeout: int = Field(10, gt=0, description="Per-request timeout, seconds.")
    retries: int = Field(0, ge=0, description="Extra attempts per failed URL.")
    min_success_rate: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Fail the stage when fewer than this fraction of rows became samples.",
    )
    demo: DemoCorpusConfig = Field(
        default_factory=DemoCorpusConfig, description="The synthetic corpus, used only when url_list is 'demo'."
    )

    @field_validator("url_list")
    @classmethod
    def _url_list_exists(cls, v: str) -> str:
        v = v.strip()
        if v == DEMO:
            return v
        if not v:
            raise ValueError("url_list is empty; give a parquet/csv path or URI, or 'demo'")
        local = _local_path(v)
        if local is not None and not os.path.exists(local):
            raise ValueError(f"url_list file {local!r} does not exist (give a parquet/csv path or URI, or 'demo')")
        return v

    @field_validator("input_format")
    @classmethod
    def _infer_format(cls, v: str | None, info: ValidationInfo) -> str | None:
        url_list = info.data.get("url_list")
        if v is not None or url_list is None or url_list == DEMO:
            return v
        inferred = _infer_input_format(url_list)
        if inferred is None:
            raise ValueError(f"cannot infer input_format from url_list {url_list!r}; set it to 'parquet' or 'csv'")
        return inferred

    @model_validator(mode="after")
    def _columns_present(self) -> "DownloadConfig":
        # Only for local files: checking a remote list here would need credentials at validation time.
        if self.url_list == DEMO:
            return self
        local = _local_path(self.url_list)
        if local is None or not os.path.isfile(local):
            return self
        cols = _columns_of(local, self.input_format)
        for name, col in (("url_col", self.url_col), ("caption_col", self.caption_col)):
            if col not in cols:
                raise ValueError(f"{name}: column {col!r} not found in url_list {local!r}; its columns are {cols}")
        return self


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _infer_input_format(uri: str) -> str | None:
    lower = uri.lower().rstrip("/")
    for fmt in ("parquet", "csv"):
        if lower.endswith("." + fmt):
            return fmt
    local = _local_path(uri)
    if local is not None and os.path.isdir(local):
        names = os.listdir(local)
        for fmt in ("parquet", "csv"):
            if any(n.endswith("." + fmt) for n in names):
                return fmt
    return None


def _columns_of(path: str, fmt: str | None) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        with pacsv.open_csv(path) as reader:
            return list(reader.schema.names)
    except Exception as e:  # pyarrow's messages do not name the file
        raise ValueError(f"url_list {path!r} is not a readable {fmt} file: {e}") from e


def _rows_per_shard(url_list: str, fmt: str, per_shard: int) -> list[int]:
    """Rows of each shard img2dataset will write: it reads the list (or a folder's ``*.{fmt}`` files,
    sorted) file by file, cutting each into ``per_shard``-row shards with consecutive ids."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = store.fs_and_path(url_list if "://" in url_list else store.normalize(url_list))
    files = sorted(fs.glob(path.rstrip("/") + f"/*.{fmt}")) if fs.isdir(path) else [path]
    out: list[int] = []
    for p in files:
        try:
            with fs.open(p, "rb") as f:
                n = pq.ParquetFile(f).metadata.num_rows if fmt == "parquet" else pacsv.read_csv(f).num_rows
        except Exception as e:  # pyarrow's messages do not name the file
            raise StageFailed(f"download: cannot read url_list file {p!r} as {fmt}: {e}") from e
        out += [min(per_shard, n - i * per_shard) for i in range(math.ceil(n / per_shard))]
    return out


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
    """The running Ray cluster's GCS address when the stage should use img2dataset's ray distributor.

    The demo corpus is served on this machine's loopback, which other nodes of a cluster cannot
    reach, so the demo always downloads with local processes. Ray is imported only here (DESIGN:
    data_prep touches Ray only when the pipeline says it runs under Ray).
    """
    if not ctx.ray_enabled or cfg.url_list == DEMO:
        return None
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations checks PyPI at import otherwise
    env["WANDB_MODE"] = "disabled"
    env["WANDB_SILENT"] = "true"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _child_main() -> None:
    """Entry point of the child process: ``python -c '...; _child_main()' args.json``."""
    with open(sys.argv[1]) as f:
        args = json.load(f)
    if args.get("ray_address"):
        import ray

        # Connect to the runner's cluster as a second driver; img2dataset's ray_distributor then
        # submits one task per shard (it ignores processes_count: parallelism is the cluster's).
        ray.init(address=args["ray_address"], runtime_env={"env_vars": args["worker_env"]})
    import img2dataset  # noqa: F401  (its __init__ rebinds the name ``img2dataset.main`` to a function)

    i2d = sys.modules["img2dataset.main"]
    _trim_img2dataset(i2d, processes_count=args["kwargs"]["processes_count"])
    i2d.download(**args["kwargs"])


class _NoLogger:
    """Stands in for img2dataset's LoggerProcess, a spawned process (a second torch import,
    seconds of CPU) that only prints running totals and feeds wandb; run() reads the per-shard
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


def _trim_img2dataset(i2d, processes_count: int) -> None:
    # download() looks both names up in img2dataset.main's globals at call time. If a future
    # img2dataset renames them, nothing is patched and the stock (slower) behaviour remains.
    if hasattr(i2d, "LoggerProcess"):
        i2d.LoggerProcess = _NoLogger
    if processes_count == 1 and hasattr(i2d, "multiprocessing_distributor"):
        i2d.multiprocessing_distributor = _inline_distributor


def _img2dataset_kwargs(cfg: DownloadConfig, url_list: str, input_format: str, shards_uri: str,
                        distributor: str) -> dict[str, Any]:
    out = shards_uri if store.scheme_of(shards_uri) != "file" else store.local_path(shards_uri)
    return dict(
        url_list=_local_path(url_list) or url_list,
        output_folder=out,
        input_format=input_format,
        url_col=cfg.url_col,
        caption_col=cfg.caption_col,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
        number_sample_per_shard=cfg.number_sample_per_shard,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
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


def _run_child(kwargs: dict[str, Any], ray_address: str | None, shards_uri: str, num_shards: int,
               log_path: str, ctx: StageContext) -> int:
    env = _child_env()
    args_path = log_path + ".args.json"
    worker_env = {k: env[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE", "WANDB_SILENT", "TQDM_DISABLE")}
    with open(args_path, "w") as f:
        json.dump({"kwargs": kwargs, "ray_address": ray_address, "worker_env": worker_env}, f)
    cmd = [sys.executable, "-c", "from data_prep.download import _child_main; _child_main()", args_path]
    with open(log_path, "wb") as log:
        # A session of its own, so the pool and logger processes img2dataset spawns can be ended
        # together (by this child's process-group id) if the stage is interrupted.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=_REPO_ROOT, start_new_session=True)
        try:
            done_before, last_check = -1, time.monotonic()
            while True:
                try:
                    return proc.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - last_check >= 2.0:  # listing an object store is not free
                    last_check = time.monotonic()
                    done = len(store.glob(store.join(shards_uri, "*_stats.json")))
                    if done != done_before:
                        ctx.progress(f"download: {done}/{num_shards} shards done")
                        done_before = done
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                proc.wait()


def _tail(path: str, n: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", errors="replace")


def run(cfg: DownloadConfig, ctx: StageContext) -> StageResult:
    shards_uri = store.join(ctx.out_uri, "shards")
    with tempfile.TemporaryDirectory(prefix="t2i-download-") as tmp, _resolved_url_list(cfg, ctx) as url_list:
        input_format = cfg.input_format or "parquet"  # demo corpus is parquet; otherwise set by validation
        rows_per_shard = _rows_per_shard(url_list, input_format, cfg.number_sample_per_shard)
        num_rows = sum(rows_per_shard)
        if num_rows == 0:
            raise StageFailed(f"download: url_list {cfg.url_list!r} has no rows")
        ray_address = _ray_address(cfg, ctx)
        distributor = "ray" if ray_address else "multiprocessing"
        kwargs = _img2dataset_kwargs(cfg, url_list, input_format, shards_uri, distributor)
        log_path = os.path.join(tmp, "img2dataset.log")
        # The runner clears a stage dir before a re-run; this makes a direct call just as safe:
        # a half-finished earlier attempt can never be mistaken for done shards.
        store.remove(shards_uri)
        ctx.progress(f"download: {num_rows} rows -> {len(rows_per_shard)} shards with img2dataset ({distributor})")
        t0 = time.time()
        try:
            rc = _run_child(kwargs, ray_address, shards_uri, len(rows_per_shard), log_path, ctx)
        finally:
            with contextlib.suppress(Exception):
                with open(log_path, "rb") as f:
                    store.write_bytes_atomic(store.join(ctx.out_uri, "img2dataset.log"), f.read())
        elapsed = time.time() - t0
        if rc != 0:
            raise StageFailed(f"download: img2dataset exited with status {rc}; end of its log:\n{_tail(log_path)}")
    store.remove(store.join(shards_uri, "_tmp"))  # img2dataset's scratch copies of the URL list
    result = _summarize(cfg, shards_uri, rows_per_shard, elapsed)
    c = result.counts
    ctx.progress(f"download: {c['successes']}/{c['total']} rows became samples in {c['shards']} shards "
                 f"({c['failed_to_download']} failed to download, {c['failed_to_resize']} failed to decode/resize)")
    return result


def _summarize(cfg: DownloadConfig, shards_uri: str, rows_per_shard: list[int], elapsed: float) -> StageResult:
    stats = read_shard_stats(shards_uri)
    tars = {shard_id(u) for u in list_shards(shards_uri)}
    expected = [f"{i:0{SHARD_DIGITS}d}" for i in range(len(rows_per_shard))]
    # A shard with no stats file (or no tar) never finished: its partial files must not look like
    # output, and all its rows count as failures.
    failed_shards = [s for s in expected if s not in stats or s not in tars]
    for s in failed_shards:
        for ext in (".tar", ".parquet", "_stats.json"):
            store.remove(store.join(shards_uri, s + ext))
    good = {s: st for s, st in stats.items() if s not in failed_shards}
    counts = {
        "total": sum(rows_per_shard),
        "successes": sum(int(st["successes"]) for st in good.values()),
        "failed_to_download": sum(int(st["failed_to_download"]) for st in good.values()),
        "failed_to_resize": sum(int(st["failed_to_resize"]) for st in good.values()),
        "rows_in_failed_shards": sum(rows_per_shard[int(s)] for s in failed_shards),
        "shards": len(good),
        "failed_shards": len(failed_shards),
    }
    rate = counts["successes"] / counts["total"]
    metrics = {"success_rate": rate, "images_per_s": counts["total"] / max(elapsed, 1e-9),
               "download_seconds": elapsed}
    if rate < cfg.min_success_rate:
        errors: Counter[str] = Counter()
        for st in good.values():
            errors.update({k: v for k, v in st.get("status_dict", {}).items() if k != "success"})
        top = "; ".join(f"{msg!r} x{n}" for msg, n in errors.most_common(5)) or "none recorded"
        worst = sorted(good.items(), key=lambda kv: kv[1]["successes"] / max(1, kv[1]["count"]))[:3]
        worst_s = ", ".join(f"{s} ({st['successes']}/{st['count']} ok)" for s, st in worst)
        msg = (f"download: success rate {rate:.1%} ({counts['successes']}/{counts['total']} rows) is below "
               f"min_success_rate {cfg.min_success_rate:.1%}. Most common errors: {top}.")
        if worst_s:
            msg += f" Worst shards: {worst_s}."
        if failed_shards:
            msg += f" Shards that did not finish (see img2dataset.log): {', '.join(failed_shards)}."
        raise StageFailed(msg)
    return StageResult(counts=counts, metrics=metrics, outputs={"shards": shards_uri})
